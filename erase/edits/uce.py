"""Unified Concept Editing, UCE (Gandikota et al., WACV 2024, arXiv 2308.14761): closed-form edit of the text-entry layers.

Each erased concept's rows are sent to the outputs its anchor's rows had (the guided concept of the
paper), the preserved prompts' rows to their own outputs, all in one regularized least-squares
solve per model (`erase.edits.algebra.uce_transform`). The preservation is a soft term: with many
erased concepts the edit trades the kept ones away (SPEED's table: about 21% accuracy on the kept
celebrities after erasing 100 with UCE), which is what the null-space edit (`speed`) prevents.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import field
from .algebra import uce_transform
from .base import Edit, EditConfig, EditRows


@dataclass
class UCEConfig(EditConfig):
    erase_scale: float = field(1.0, "weight of the erased rows' targets (UCE's erase_scale)")
    # 1, as UCE's current script (uce_sd_erase.py). Its first script's max(0.1, 1 / retain prompts) cost
    # the SD3 miniature's "eight" 3.6 points when "three" was erased; 1 kept it, and every digit of
    # the SD miniature, for one and three erased digits (BENCHMARKS.md section 12).
    preserve_scale: float = field(1.0, "weight of the preserved rows (UCE's preserve_scale)")

    def __post_init__(self):
        super().__post_init__()
        if not self.erase_scale > 0 or self.preserve_scale < 0:
            raise ValueError("erase_scale must be positive and preserve_scale at least 0")


class UCE(Edit):
    name = "uce"
    Config = UCEConfig

    def transform(self, rows: EditRows):
        return uce_transform(rows.erase, rows.anchor, rows.preserve, self.config.lamb, self.config.erase_scale,
                             self.config.preserve_scale)
