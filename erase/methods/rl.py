"""RL: "random label" remapping, the fixed-remap baseline of SalUn (Fan et al., arXiv 2310.12508).

`remap(forget → anchor) + α·denoise(retain)`: the forget condition is trained to predict what the
anchor condition predicts on the same noisy forget image, while the retain data keeps the rest.
SalUn sums the retain loss over pixels and averages the remap loss; our losses are means, so the
retain term is multiplied by the elements per sample to keep the paper's `α = 1e-3` meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import field
from .base import Method, MethodConfig
from .losses import anchor_target, mse, per_sample_size, predict


@dataclass
class RLConfig(MethodConfig):
    lr: float = field(1e-4, "Adam learning rate (SalUn CIFAR-10 DDPM: 1e-4; digits: 1e-4 kept more than 5e-4, see BENCHMARKS.md)")
    alpha: float = field(1e-3, "weight of the retain loss summed over pixels (SalUn: 1e-3 for the DDPM, "
                               "0.1 for SD)")
    antithetic: bool = field(True, "draw timesteps in pairs t, T-1-t within a batch (as SalUn does)")

    def __post_init__(self):
        super().__post_init__()
        if self.alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {self.alpha}")


class RL(Method):
    name = "rl"
    Config = RLConfig

    def loss(self, batch):
        f, r = batch.forget, batch.retain
        target = anchor_target(self.model, f)
        pred_f, pred_r = predict(self.model, f, r)
        forget, retain = mse(pred_f, target), mse(pred_r, r.noise)
        loss = forget + self.config.alpha * per_sample_size(r.x0) * retain
        return loss, {"remap": forget.item(), "retain": retain.item()}
