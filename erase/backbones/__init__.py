"""Backbones: the model families the methods run on, behind one small interface.

A backbone answers the questions a method asks (encode a condition, the null condition, noise
prediction, parameter groups, a frozen reference copy) so that methods never branch on model type.
"""

from __future__ import annotations

from pathlib import Path

from ..utils import EraseError
from .ddpm import MODEL_FILE, ClassConditionalDDPM

__all__ = ["ClassConditionalDDPM", "load_backbone"]


def load_backbone(path: str | Path):
    """Load any model folder this package wrote (or a diffusers pipeline folder, once supported)."""
    path = Path(path)
    if not path.exists():
        raise EraseError(f"model {path} does not exist")
    if (path / MODEL_FILE).is_file():
        return ClassConditionalDDPM.from_pretrained(path)
    raise EraseError(f"{path} is not a model folder: expected {MODEL_FILE} (a class-conditional DDPM "
                     "written by `erase train-base` or `erase unlearn`)")
