"""Null-space constrained erasure after SPEED (Li et al., ICLR 2026, arXiv 2503.07392): preserved prompts' outputs stay unchanged.

Why SPEED's form rather than OCE's (arXiv 2605.28902): SPEED's closed form (the AlphaEdit-style
update `Δ = R K_eᵀ P (K_e K_eᵀ P + λI)⁻¹`, `erase.edits.algebra.null_space_transform`) is a hard
constraint, `Δ k_p = 0` for every preserved row k_p in the null space the projector keeps, which the
tests can check to numerical precision, and it is written entirely in terms of the rows the
backbone contract gives (no image, no timestep), so it runs unchanged on every backbone with
text-entry layers. SPEED's paper also publishes the 100-celebrity protocol this package reads
(`erase.concept_sets`). What is taken from SPEED: the projector from the eigen-decomposition of the
preserved rows' covariance, cut at a threshold (`null_threshold`, relative to the largest
eigenvalue here), and its invariant equality constraint: the null text (the empty prompt, every
row of it, the start token among them) is always preserved, so unconditional predictions, and with
them classifier-free guidance, are untouched. Not implemented: SPEED's influence-based prior
filtering and directed prior augmentation (choosing and augmenting the preserved set); here the
preserved set is the retain prompts as given.

When the preserved rows span (nearly) every direction, the null space is empty and the edit cannot
move the erased rows: `erase_error` in erase_config.json stays near 1. Raise `null_threshold` (a
softer constraint) or give fewer retain prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import field
from .algebra import null_space_projector, null_space_transform
from .base import Edit, EditConfig, EditRows


@dataclass
class SpeedConfig(EditConfig):
    lamb: float = field(1.0, "weight that keeps the edited weights near the original ones (λ of the closed form; "
                             "larger than uce's: a small λ lets the edit grow large along the directions the "
                             "preserved rows barely take, and what they have there leaks out)")
    null_threshold: float = field(1e-3, "eigenvalues of the preserved rows' covariance at most this fraction of "
                                        "the largest count as its null space (the edit's room; larger: more "
                                        "room, preserved outputs move more)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.null_threshold < 1:
            raise ValueError(f"null_threshold must be in [0, 1), got {self.null_threshold}")


class Speed(Edit):
    name = "speed"
    Config = SpeedConfig
    preserve_null_text = True

    def transform(self, rows: EditRows):
        projector = null_space_projector(rows.preserve, self.config.null_threshold)
        return null_space_transform(rows.erase, rows.anchor, projector, self.config.lamb)
