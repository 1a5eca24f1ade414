"""GA: gradient ascent on the forget data (the baseline of Fan et al., SalUn, arXiv 2310.12508).

`−denoise(forget) + α·denoise(retain)`. The forget term is unbounded below, so a long run destroys
the model; it is kept as the reference point for that failure, and the loop's NaN guard stops it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import field
from .base import Method, MethodConfig
from .losses import mse, predict


@dataclass
class GAConfig(MethodConfig):
    lr: float = field(3e-5, "Adam learning rate (measured on the digits model: 3e-5 forgets the digit in 40 steps "
                                 "and already costs 40 points of retained accuracy; 1e-5 does not forget)")
    alpha: float = field(1.0, "weight of the retain denoising loss (0 is pure ascent)")

    def __post_init__(self):
        super().__post_init__()
        if self.alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {self.alpha}")


class GA(Method):
    name = "ga"
    Config = GAConfig

    def loss(self, batch):
        f, r = batch.forget, batch.retain
        pred_f, pred_r = predict(self.model, f, r)
        forget, retain = mse(pred_f, f.target), mse(pred_r, r.target)
        return -forget + self.config.alpha * retain, {"forget": forget.detach(), "retain": retain.detach()}
