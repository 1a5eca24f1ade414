"""Batched generation through the backbones, sharded across processes with accelerate.

Every image has its own seed, and the UNet always runs on batches of exactly `batch_size` images
(the last one padded), so an image does not depend on the batch it lands in nor on how many
processes share the work: `torchrun --nproc_per_node 2 -m erase.cli -- eval ...` (or
`accelerate launch --multi_gpu --num_processes 2 -m erase.cli eval ...`, which works on CPUs too)
writes the same files as a single process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from accelerate import PartialState

from erase.sampling import to_pil, to_uint8
from erase.outputs import mark_output
from erase.utils import EraseError, logger, replace_dir

from .prompts import PromptItem


def process_state() -> PartialState:
    """accelerate's view of the processes sharing this run (one, or those of torchrun / accelerate launch).

    Without a GPU, accelerate joins the launched processes into one gloo group only when asked to
    run on the CPU; otherwise each process would believe it is alone and do all the work.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def show_progress(state: PartialState) -> bool:
    """Whether to draw progress bars (with ETA): on the main process, when stderr is a terminal (not
    in logs or CI), unless asked not to with TQDM_DISABLE=1 (tqdm's own switch)."""
    asked_off = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return state.is_local_main_process and sys.stderr.isatty() and not asked_off


def my_share(state: PartialState, n: int) -> list[int]:
    """The indices of items 0..n-1 that this process generates (contiguous slices, as accelerate splits)."""
    with state.split_between_processes(list(range(n))) as mine:
        return list(mine)


def sample_prompts(model, items: Sequence[PromptItem], steps: int, batch_size: int,
                   height: int | None = None, width: int | None = None, progress: bool = False,
                   on_batch: Callable[[list[int], torch.Tensor], None] | None = None) -> torch.Tensor:
    """Samples of a text backbone in [-1, 1], one per prompt with the prompt's own seed and guidance.

    A sampling call takes one guidance scale and one size, so items are grouped by guidance and by
    size (an item's own, e.g. an I2P row's, unless `height`/`width` are given); the backbone cuts
    each group into batches of `batch_size` and pads the last one. Each image's initial noise comes
    from its own CPU generator seeded with the item's seed as is (`raw_seeds`), so that an I2P row's
    `sd_seed` means what it meant to the dataset's authors (up to the device they drew the noise on:
    CPU noise makes the images independent of the device here); the sampler is the pipeline's own.
    `progress` draws a bar over the images with an ETA (the backbone is called one batch at a time
    for it, which gives the same images: each depends only on its prompt, seed and the batch size).
    `on_batch(indices, images)` is called after each batch with the items' indices and their images,
    so that a measurement can start on them while the next batch is drawn.
    """
    from tqdm.auto import tqdm

    if not items:  # a process with no share (more processes than prompts)
        return torch.empty(0, 3, 0, 0)
    out: dict[int, torch.Tensor] = {}
    groups: dict[tuple, list[int]] = {}  # one sampling call per guidance and image size
    for i, item in enumerate(items):
        size = (height if height is not None else item.height, width if width is not None else item.width)
        groups.setdefault((item.guidance, *size), []).append(i)
    bar = tqdm(total=len(items), desc="generating", unit="image", disable=not progress)
    for (guidance, group_height, group_width), idx in groups.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            images = model.sample([items[i].prompt for i in chunk], [items[i].seed for i in chunk], steps=steps,
                                  guidance=guidance, batch_size=batch_size, raw_seeds=True, scheduler="shipped",
                                  height=group_height, width=group_width)
            out.update(zip(chunk, images))
            if on_batch is not None:
                on_batch(chunk, images)
            bar.update(len(chunk))
    bar.close()
    return torch.stack([out[i] for i in range(len(items))])


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images as they will be read back from their PNG files (8 bits per channel), in [-1, 1].

    Metrics are computed on these, so that they equal what any tool reading the saved files sees.
    """
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def save_pngs(folder: Path, files: Sequence[str], images: torch.Tensor) -> None:
    """Images in [-1, 1] as 8-bit PNG files at the relative paths `files` under `folder`."""
    for rel, image in zip(files, to_uint8(images)):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(image).save(path)


def load_images(paths: Sequence[Path], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Image files as (N, C, H, W) in [-1, 1]; grey stays one channel, anything else becomes RGB.

    `size` (height, width) resizes each image (bicubic), so that reference images of any size can
    be stacked with generated ones.
    """
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as img:
            img = img.convert("L" if img.mode in ("L", "I", "1") else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BICUBIC)
            arr = np.asarray(img)
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@contextlib.contextmanager
def shared_run_dir(out: str | Path, state: PartialState) -> Iterator[Path]:
    """Like `erase.utils.atomic_dir`, for several processes writing into one folder.

    All processes write into `.OUT.partial` beside OUT (a name they agree on without talking);
    once everyone is done, the main process swaps it in place of OUT in one rename.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    state.wait_for_everyone()
    try:
        yield tmp
    except BaseException:
        if state.num_processes == 1:  # with several, the others may still be writing into it
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    state.wait_for_everyone()
    if state.is_main_process:
        mark_output(tmp, "eval")
        replace_dir(tmp, out)
    state.wait_for_everyone()


def check_images(images: torch.Tensor, state: PartialState) -> torch.Tensor:
    """Refuse generated images of which none is finite (a diverged model draws NaN); warn about some.

    An image with NaN pixels would otherwise be written and measured as a black image.
    """
    bad = (~torch.isfinite(images.flatten(1)).all(1)).sum() if len(images) else torch.zeros((), dtype=torch.long)
    counts = torch.stack([bad.long(), torch.tensor(len(images))]).to(state.device)
    if state.num_processes > 1:
        from accelerate.utils import reduce

        counts = reduce(counts, reduction="sum")
    bad_total, total = counts.tolist()
    if total and bad_total == total:
        raise EraseError(f"all {total} generated images hold NaN or infinite pixels: the model is broken "
                         "(a diverged run?); there is nothing to measure")
    if bad_total:
        logger.warning("%d of %d generated images hold NaN or infinite pixels; they are measured as written "
                       "(clamped to black)", bad_total, total)
    return images


def load_text_backbone(path: str | Path, device: torch.device, protocol: str):
    """A text-to-image model (pipeline folder, single file or Hub id) on `device`, or a clear refusal."""
    from erase.backbones import load_backbone

    model = load_backbone(path)
    if model.condition_kind != "text":
        raise EraseError(f"{path} is a {model.name} model, not a text-to-image one: {protocol} generates from "
                         "prompts; use digits-class or cifar10-class for class-conditional models")
    return model.to(device)
