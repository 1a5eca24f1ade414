"""What the prompt-file protocols (`i2p-nudity`, `t2i-utility`) share: drawing their prompts' images,
the run's index and the record of every prompt handed to the generator."""

from __future__ import annotations

from erase.utils import warn_if_costly, write_json

from ..generation import check_images, quantize, sample_prompts, save_pngs, shared_run_dir, show_progress
from .base import INDEX_FILE, METRICS_FILE


def _prompt_options(protocol) -> dict:
    """The sampling options `sample_prompts` passes the backbone (for the batch-size probe)."""
    return {"height": protocol.height, "width": protocol.width, "scheduler": "shipped"}


def _generate_prompt_images(items, mine, model, steps, batch_size, height, width, state, on_batch=None, warn=True):
    """Generate this process's share of prompt images; returns them quantized as their PNGs will read.
    `on_batch(indices into mine, images)` sees each batch as it is drawn (`sample_prompts`); `warn`
    says up front that the whole request is large (a caller drawing it in parts warns once itself)."""
    if warn:
        warn_if_costly("eval", len(items), steps)
    return quantize(check_images(sample_prompts(model, [items[k] for k in mine], steps=steps, batch_size=batch_size,
                                                height=height, width=width, progress=show_progress(state),
                                                on_batch=on_batch), state))


def _write_prompt_run(out, state, files: list[str], mine, images, items, results: dict) -> None:
    """This process's PNGs; the index and metrics.json from the main process; swapped in at once.
    `images`: one tensor, or a list of (C, H, W) images where the prompts' sizes differ."""
    with shared_run_dir(out, state) as tmp:
        for k, image in zip(mine, images):
            save_pngs(tmp, [files[k]], image[None])
        if state.is_main_process:
            write_json(tmp / INDEX_FILE, _prompt_index(files, items))
            write_json(tmp / METRICS_FILE, results)


def _prompt_set_results(items, description: dict) -> dict:
    """What a prompt protocol writes about its prompts: the file as read, and every (prompt, seed,
    guidance) that was handed to the generator, in order, so a run can be checked against the file."""
    return {"prompt_set": description, "generated": [
        {"prompt": it.prompt, "seed": it.seed, "guidance": it.guidance, "source_row": it.source_row,
         **({"width": it.width, "height": it.height} if it.width or it.height else {})} for it in items]}


def _prompt_index(files: list[str], items) -> dict:
    return {"kind": "prompts", "images": [
        {"file": f, "prompt": it.prompt, "seed": it.seed, "guidance": it.guidance, "source_row": it.source_row}
        for f, it in zip(files, items)]}
