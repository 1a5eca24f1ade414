"""Backbones: the model families the methods run on, behind one contract (`erase.backbones.base`).

A backbone answers the questions a method, the loop, the evaluation and the bench ask (conditions,
the null condition, timesteps, noising, the training target, predictions, parameter groups, a
frozen reference copy, sampling, saving) so that no code outside this package branches on the model.
Backbones are registered by name in `BACKBONES`; `load_backbone` probes each in turn.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

from ..outputs import check_finished
from ..resources import model_location
from ..utils import EraseError
from .base import Backbone, Condition, ModelSource
from .ddpm import MODEL_FILE, ClassConditionalDDPM
from .flux import FluxBackbone
from .sd3 import StableDiffusion3Backbone
from .sdxl import StableDiffusionXLBackbone
from .stable_diffusion import StableDiffusionBackbone

BACKBONES: dict[str, type[Backbone]] = {b.name: b for b in (
    ClassConditionalDDPM, StableDiffusionBackbone, StableDiffusionXLBackbone, StableDiffusion3Backbone, FluxBackbone)}

# The submodules are listed too, so that documentation tools (pdoc) walk them.
__all__ = ["BACKBONES", "Backbone", "ClassConditionalDDPM", "Condition", "FluxBackbone", "StableDiffusion3Backbone",
           "StableDiffusionBackbone", "StableDiffusionXLBackbone", "get_backbone", "load_backbone", "run_model",
           *sorted(m.name for m in pkgutil.iter_modules(__path__))]


def get_backbone(name: str) -> type[Backbone]:
    if name not in BACKBONES:
        raise EraseError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def load_backbone(path: str | Path, **kwargs) -> Backbone:
    """Load a model: a folder this package wrote, a diffusers pipeline folder, a single
    .safetensors/.ckpt checkpoint, or a Hub id (`owner/name`, resolved through the local Hugging
    Face cache when offline). Each registered backbone is asked in turn whether it loads it.

    Keyword arguments go to the pipeline backbones' `from_source` (`config=`, `frozen_dtype=`).
    """
    path = model_location(path)  # a shipped model's name, as on the command line
    check_finished(Path(path))  # a run that has not reached its end: say how to finish it
    source = ModelSource.resolve(path)
    for backbone in BACKBONES.values():
        if backbone.accepts(source):
            return backbone.from_source(source, **kwargs)
    if source.kind == "file":
        found = "a file whose tensor names match no known checkpoint layout"
    elif source.pipeline_class:
        found = f"a {source.pipeline_class} (model_index.json)"
    else:
        found = f"a folder with no {MODEL_FILE} nor model_index.json"
    tried = "; ".join(f"{b.name}: {b.accepts_description}" for b in BACKBONES.values())
    raise EraseError(f"{path} is not a model any backbone loads: it is {found}. Tried {tried}")


def run_model(model: str | Path | Backbone) -> tuple[Backbone, str]:
    """The model a run trains or edits: loaded when given as a folder, file or Hub id (a backbone object
    is used as it is), and the base model the run's records name (what was given, or the object's source)."""
    if isinstance(model, (str, Path)):
        return load_backbone(model), str(model)
    return model, model.info.get("source", "in-memory model")
