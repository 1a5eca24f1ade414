"""`t2i-utility`: what a text-to-image model keeps, FID and CLIP score on a captions file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from erase.config import field
from erase.sampling import to_uint8

from ..generation import load_images, load_text_backbone, my_share, process_state
from ..metrics import clip_score_metric
from ..prompts import read_prompt_set
from .base import (COMPILE_HELP, Protocol, _at_least_one, _batch_size_help, _batches, _compile_if_asked,
                   cpu_prompt_batch, _device_batch_size, _fid, _fid_metrics, _load_classifier)
from .image_checks import clip_what_the_images_are, reference_image_files
from .prompt_runs import _generate_prompt_images, _prompt_options, _prompt_set_results, _write_prompt_run


@dataclass
class T2IUtility(Protocol):
    """Utility of a text-to-image model: FID against reference images and CLIP score on a captions file."""

    name: ClassVar[str] = "t2i-utility"
    prompts: str | None = field(None, "captions: a text file, one per line (# comments), or the COCO-30k CSV "
                                      "(case_number, source, prompt, evaluation_seed, coco_id) with its seeds")
    layout: str = field("auto", "the captions file's layout: auto (a .csv file's from its header, other files one "
                                "caption per line), text or coco", choices=("auto", "text", "coco"))
    reference: str | None = field(None, "folder of reference images (e.g. the COCO images of the captions)")
    clip_model: str | None = field(None, "local CLIP model folder (CLIPModel + CLIPProcessor save_pretrained)")
    fid_features: str = field("inception", "FID feature space: 'inception' or 'classifier'",
                              choices=("classifier", "inception"))
    fid_weights: str | None = field(None, "local Inception weights file for FID")
    classifier: str | None = field(None, "classifier folder when --fid-features classifier")
    seed: int | None = field(None, "caption i gets the seed derived from (seed, i) (default 0); a CSV's own seeds "
                                   "are used unless this is given, then it is every caption's seed")
    guidance: float = field(7.5, "CFG scale")
    steps: int = field(50, "denoising steps")
    height: int | None = field(None, "image height (default: the pipeline's)")
    width: int | None = field(None, "image width (default: the pipeline's)")
    batch_size: int | None = field(None, _batch_size_help("4 at 512 px, more for smaller images up to 64", "pipeline"))
    compile: bool = field(False, COMPILE_HELP)
    limit: int | None = field(None, "only the first N captions")
    fid_bootstrap: int = field(50, "bootstrap resamples over generated images for FID's 95% interval (0: none; "
                                   "each costs a 2048-d matrix square root with Inception)")

    def __post_init__(self):
        missing = [f"--{name.replace('_', '-')}" for name in ("prompts", "reference", "clip_model")
                   if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} required")
        _at_least_one(self, "steps", "batch_size", "limit", "height", "width")

    def _reference_files(self) -> list[Path]:
        return reference_image_files(self.reference)

    def run(self, model_path, out, state=None):
        state = state or process_state()
        items, prompt_set = read_prompt_set(self.prompts, self.layout, seed=self.seed, guidance=self.guidance)
        items = items[:self.limit]
        reference = self._reference_files()
        clip = clip_score_metric(self.clip_model).to(state.device)
        classifier = _load_classifier(self.classifier, state.device) if self.fid_features == "classifier" else None
        fid = _fid(self.fid_features, classifier, self.fid_weights, state.device, self.fid_bootstrap)
        model = load_text_backbone(model_path, state.device, self.name)
        _compile_if_asked(model, self.compile)
        mine = my_share(state, len(items))
        batch_size = _device_batch_size(self, model, items[0].prompt if items else "",
                                        cpu_prompt_batch(model, self.height, self.width), state, len(items),
                                        **_prompt_options(self))
        images = _generate_prompt_images(items, mine, model, self.steps, batch_size, self.height, self.width, state)
        size = tuple(images.shape[-2:]) if len(images) else None
        with torch.no_grad():
            for b in _batches(len(images)):
                x = images[b].to(state.device)
                fid.update(x, real=False)
                clip.update(list(torch.from_numpy(to_uint8(x.cpu())).permute(0, 3, 1, 2)),
                            [items[k].prompt for k in mine[b]])
            mine_ref = my_share(state, len(reference))
            for b in _batches(len(mine_ref)):
                fid.update(load_images([reference[k] for k in mine_ref[b]], size=size).to(state.device), real=True)
        fid_result = fid.compute()
        metrics = {"clip_score": float(clip.compute()), **_fid_metrics(fid_result)}
        # Whether the captions' images are data (with a file of the erased concept's prompts: what it draws instead).
        data, calibration = clip_what_the_images_are(self.clip_model, self.reference, images, "", self.fid_bootstrap,
                                                      state)
        files = [f"images/{k:05d}.png" for k in range(len(items))]
        results = self._results(model_path, state, metrics | data, len(items), fid.feature_name,
                                clip_model=str(Path(self.clip_model).resolve()),
                                reference=str(Path(self.reference).resolve()),
                                in_distribution_calibration=calibration, **_prompt_set_results(items, prompt_set))
        _write_prompt_run(out, state, files, mine, images, items, results)
        return results
