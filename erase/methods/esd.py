"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023, arXiv 2303.07345).

`neg_guidance`: the forget condition is trained to predict the reference model's negatively guided
noise `ε_0(∅) − η(ε_0(c_f) − ε_0(∅))`, so sampling with it steers away from the concept. No retain
term. ESD-u trains everything but cross-attention (`noxattn`, for broad concepts), ESD-x only
cross-attention (`xattn`, for a specific concept). Backbones without cross-attention (the
class-conditional DDPM) fall back to `all`.
**[adaptation]** for class erasure `x_t` is made by noising real forget images (the "cached images"
option) instead of by partially sampling from the current model; sampling is not implemented yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import field
from .base import Method, MethodConfig
from .losses import neg_guidance


@dataclass
class ESDConfig(MethodConfig):
    lr: float = field(2e-4, "Adam learning rate (paper, SD 1.x: 1e-5; authors' script: 5e-5; digits: 2e-4)")
    eta: float = field(1.0, "negative guidance scale η (paper: 1; the authors' current script: 2)")

    def __post_init__(self):
        super().__post_init__()
        if self.eta <= 0:
            raise ValueError(f"eta must be positive, got {self.eta}")


class ESD(Method):
    name = "esd"
    Config = ESDConfig
    forget_share = 1.0
    params_preference = ("noxattn", "all")

    def setup(self):
        self.ref = self.model.frozen_copy()

    def loss(self, batch):
        loss = neg_guidance(self.model, self.ref, batch.forget, self.config.eta)
        return loss, {"esd": loss.detach()}
