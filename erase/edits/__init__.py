"""Closed-form edits: concept erasure by rewriting the layers where text enters the denoiser.

No images and no training loop: the backbone's text-entry layers (`Backbone.text_entry_layers`)
and the rows of text embeddings prompts feed them (`Backbone.text_entry_inputs`), one solve, one
matrix product per layer. They run through the same entry point as the fine-tuning methods
(`erase unlearn --method uce`, `erase.unlearn(model, "uce", ...)`) and write the same outputs.

- `uce`: UCE's closed form (arXiv 2308.14761);
- `speed`: the null-space constrained edit of SPEED (arXiv 2503.07392);
- `harden=K` on either: RECE's closed-form adversarial embeddings (arXiv 2407.12383), K rounds.
"""

from __future__ import annotations

from ..utils import EraseError
from .base import Edit, EditConfig, apply_edit
from .speed import Speed
from .uce import UCE

EDITS: dict[str, type[Edit]] = {e.name: e for e in (UCE, Speed)}

__all__ = ["EDITS", "Edit", "EditConfig", "apply_edit", "get_edit", "algebra", "base", "run", "speed", "uce"]


def get_edit(name: str) -> type[Edit]:
    if name not in EDITS:
        raise EraseError(f"unknown edit {name!r}; choose one of {', '.join(EDITS)}")
    return EDITS[name]
