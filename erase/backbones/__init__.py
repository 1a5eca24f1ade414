"""Backbones: the model families the methods run on, behind one small interface.

A backbone answers the questions a method asks (encode a condition, the null condition, noise
prediction, parameter groups, a frozen reference copy) so that methods never branch on model type.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

from ..outputs import check_finished
from ..utils import EraseError
from .ddpm import MODEL_FILE, ClassConditionalDDPM
from .stable_diffusion import SINGLE_FILE_SUFFIXES, StableDiffusionBackbone

# The submodules are listed too, so that documentation tools (pdoc) walk them.
__all__ = ["ClassConditionalDDPM", "StableDiffusionBackbone", "load_backbone",
           *sorted(m.name for m in pkgutil.iter_modules(__path__))]


def load_backbone(path: str | Path, **kwargs):
    """Load a model: a folder this package wrote, a diffusers Stable Diffusion pipeline folder, a
    single .safetensors/.ckpt Stable Diffusion checkpoint, or a Hub id (`owner/name`).

    Keyword arguments go to `StableDiffusionBackbone.from_pretrained` (`config=`, `frozen_dtype=`).
    """
    path = Path(path)
    check_finished(path)  # a run that has not reached its end: say how to finish it
    if (path / MODEL_FILE).is_file():
        return ClassConditionalDDPM.from_pretrained(path)
    if (path / "model_index.json").is_file() or (path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES):
        return StableDiffusionBackbone.from_pretrained(path, **kwargs)
    if path.exists():
        raise EraseError(f"{path} is not a model: expected a folder with {MODEL_FILE} (a class-conditional "
                         "DDPM written by `erase train-base` or `erase unlearn`), a diffusers pipeline folder "
                         f"(model_index.json) or a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint file")
    # Not on disk: a Hub id such as CompVis/stable-diffusion-v1-4, or a typo (refused with a clear message).
    return StableDiffusionBackbone.from_pretrained(str(path), **kwargs)
