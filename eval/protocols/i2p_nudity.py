"""`i2p-nudity`: nudity erasure in Stable Diffusion, NudeNet counts on one image per prompt."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from erase.config import field
from erase.sampling import to_uint8
from erase.utils import warn_if_costly

from ..generation import load_text_backbone, my_share, process_state, show_progress
from ..metrics import NudeNet, NudityCounts, nudenet_preset, wilson_interval
from ..prompts import I2P_SUBSETS, LAYOUTS, one_image_size, read_prompt_set
from .base import (COMPILE_HELP, Protocol, _at_least_one, _batch_size_help, _compile_if_asked, cpu_prompt_batch,
                   _device_batch_size)
from .image_checks import clip_what_the_images_are, reference_image_files, not_measured
from .prompt_runs import _generate_prompt_images, _prompt_options, _prompt_set_results, _write_prompt_run


def _size(item, height: int | None, width: int | None) -> tuple[int | None, int | None]:
    """The size an item is drawn at: the one given for every prompt, else its own (None: the pipeline's)."""
    return (height if height is not None else item.height, width if width is not None else item.width)


def _draw_and_detect(generate, detector, overlap: bool, progress: bool) -> tuple:
    """Images of one size (`generate(on_batch=...)`) and NudeNet's detections on each of them."""
    if not overlap:
        images = generate()
        return images, detector.detect(to_uint8(images), progress=progress)
    # NudeNet runs on the CPU (onnxruntime releases the GIL) on each batch while the next one is
    # drawn on the GPU, so its time hides behind generation's. On a CPU-only machine both would
    # share the same cores: measured slower there (BENCHMARKS.md section 8), so not the default.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = []
        images = generate(on_batch=lambda idx, batch: pending.append(
            (idx, pool.submit(detector.detect, to_uint8(batch)))))
        found = {i: d for idx, job in pending for i, d in zip(idx, job.result())}
    # The same uint8 images as the PNGs: to_uint8 of a batch equals to_uint8 of its quantized images.
    return images, [found[i] for i in range(len(images))]


def _together(images: list):
    """Images of one size as one (N, C, H, W) tensor, as the measurements take them; a list where sizes differ."""
    if not images:  # a process with no share (more processes than prompts)
        return torch.empty(0, 3, 0, 0)
    return torch.stack(images) if len({tuple(image.shape) for image in images}) == 1 else images


@dataclass
class I2PNudity(Protocol):
    """Nudity erasure in Stable Diffusion: one image per I2P prompt with its seed, NudeNet counts."""

    name: ClassVar[str] = "i2p-nudity"
    prompts: str | None = field(None, "prompt set: an I2P CSV (either layout), MMA-Diffusion's, Ring-A-Bell's, P4D's "
                                      "or UnlearnDiffAtk's CSV as published, or a text file (one prompt per line)")
    layout: str = field("auto", "the file's layout: auto (from a CSV's header; other files one prompt per line), "
                                "text, " + ", ".join(LAYOUTS), choices=("auto", "text", *LAYOUTS))
    prompt_column: str | None = field(None, "column of the prompts (default: the layout's; e.g. clean_prompt for "
                                            "MMA-Diffusion's clean rate, 'normal prompt' for Ring-A-Bell's)")
    subset: str = field("all", "I2P subset: all, sexual, nudity (nudity_percentage > 0), nudity50 (> 50)")
    seed: int | None = field(None, "one seed for every prompt (default: each row's own; a file without seeds: "
                                   "row i gets a seed derived from (0, i))")
    guidance: float | None = field(None, "CFG scale for every prompt (default: each row's own where the file gives "
                                         "one, as I2P, P4D and UnlearnDiffAtk do; 7.5 where it does not)")
    row_guidance: bool = field(False, "kept for old command lines: each row's guidance is now the default")
    steps: int = field(50, "denoising steps (the field: 50 to 100)")
    height: int | None = field(None, "image height for every prompt (default: each row's sd_image_height where the "
                                     "file gives one, rows of several sizes each drawn at its own; else the "
                                     "pipeline's, 512 for SD 1.x)")
    width: int | None = field(None, "image width for every prompt (default: each row's sd_image_width, else the "
                                    "pipeline's)")
    batch_size: int | None = field(None, _batch_size_help("4 at 512 px, more for smaller images up to 64", "pipeline"))
    compile: bool = field(False, COMPILE_HELP)
    preset: str = field("scissorhands", "NudeNet counting preset: scissorhands, salun-esd, selective-amnesia, "
                                        "unlearndiffatk")
    nudenet_batch_size: int = field(16, "images per NudeNet call")
    limit: int | None = field(None, "only the first N prompts of the subset (quick checks)")
    overlap_detection: bool | None = field(None, "run NudeNet on each batch while the next is generated "
                                                 "(default: on a GPU; same counts either way)")
    reference: str | None = field(None, "folder of real images (e.g. COCO's) to say whether the images are data "
                                        "at all: an in-distribution score and an FID in CLIP's image embeddings "
                                        "against them (needs --clip-model)")
    clip_model: str | None = field(None, "local CLIP model folder for --reference")
    fid_bootstrap: int = field(50, "bootstrap resamples for the CLIP FID's 95% interval (0: none)")

    def __post_init__(self):
        if self.prompts is None:
            raise ValueError("--prompts is required: the I2P CSV")
        if self.subset not in I2P_SUBSETS:
            raise ValueError(f"unknown I2P subset {self.subset!r}: choose one of {', '.join(I2P_SUBSETS)}")
        if self.row_guidance and self.guidance is not None:
            raise ValueError("--row-guidance uses each row's guidance and --guidance one for every row: give one")
        _at_least_one(self, "steps", "batch_size", "nudenet_batch_size", "limit", "height", "width")
        nudenet_preset(self.preset)
        if (self.reference is None) != (self.clip_model is None):
            raise ValueError("--reference and --clip-model go together: the reference images are compared with "
                             "the generated ones in the CLIP model's image features")
        if self.fid_bootstrap < 0:
            raise ValueError("fid_bootstrap must be at least 0")

    def run(self, model_path, out, state=None):
        state = state or process_state()
        items, prompt_set = read_prompt_set(self.prompts, self.layout, self.subset, self.seed, self.guidance,
                                            self.prompt_column)
        items = items[:self.limit]
        if self.reference is not None:  # the CLIP check measures the images together, at one size
            one_image_size(items, self.height, self.width)
            reference_image_files(self.reference)  # a wrong folder is refused before any image is drawn
        model = load_text_backbone(model_path, state.device, self.name)
        _compile_if_asked(model, self.compile)
        mine = my_share(state, len(items))
        detector = NudeNet(self.nudenet_batch_size)
        batch_size = _device_batch_size(self, model, items[0].prompt if items else "",
                                        cpu_prompt_batch(model, self.height, self.width), state, len(items),
                                        **_prompt_options(self))
        overlap = state.device.type != "cpu" if self.overlap_detection is None else self.overlap_detection
        warn_if_costly("eval", len(items), self.steps)
        images, detections = [None] * len(mine), [None] * len(mine)
        # One sampling size at a time: a row's own size (I2P's sd_image_width/height) unless --height/--width
        # give one for all. Every process walks the same sizes, even where its share has none of them.
        for height, width in dict.fromkeys(_size(it, self.height, self.width) for it in items):
            where = [j for j, k in enumerate(mine) if _size(items[k], self.height, self.width) == (height, width)]
            generate = partial(_generate_prompt_images, items, [mine[j] for j in where], model, self.steps,
                               batch_size, height, width, state, warn=False)
            drawn, found = _draw_and_detect(generate, detector, overlap, show_progress(state))
            for j, image, detected in zip(where, drawn, found):
                images[j], detections[j] = image, detected
        images = _together(images)
        counts = NudityCounts(self.preset).to(state.device)
        counts.update(detections)
        metrics = counts.compute()
        metrics["fraction_with_any_ci95"] = list(wilson_interval(metrics["images_with_any"], metrics["images"]))
        if "nude_images" in metrics:
            metrics["fraction_nude_ci95"] = list(wilson_interval(metrics["nude_images"], metrics["images"]))
        # Every I2P prompt asks for the erased concept: are its images data at all (against real images)?
        extra = {"in_distribution_calibration": not_measured(
            "no --reference folder of real images (e.g. COCO's, with --clip-model) was given")}
        if self.reference is not None:
            data, extra["in_distribution_calibration"] = clip_what_the_images_are(
                self.clip_model, self.reference, images, "forget_", self.fid_bootstrap, state)
            metrics |= data
        files = [f"images/{k:05d}.png" for k in range(len(items))]
        results = self._results(model_path, state, metrics, len(items), None, nudenet=counts.settings(),
                                prompts_file=str(Path(self.prompts).resolve()),
                                **_prompt_set_results(items, prompt_set), **extra)
        _write_prompt_run(out, state, files, mine, images, items, results)
        return results
