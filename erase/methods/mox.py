"""MOX: memorize, then extrapolate ("memorize to forget", arXiv 2602.06441).

**[adaptation]** the paper unlearns LLMs; this is its recipe on a denoiser. It never ascends:
1. train a memorization model `θ_m` (the trainable weights, starting at `θ_0`) by descent on
   `denoise(forget) + γ·consistency(retain)`, so it knows the forget data even better while its
   retain predictions stay those of the reference (the paper's KL on retain data is, for a Gaussian
   denoiser, the squared distance of the noise predictions);
2. return `θ_u = θ_0 + α(θ_0 − θ_m)`: step away from what memorizing the forget data changed.
The momentum variant averages `θ_u` during training: `θ_u ← η·θ_u(new) + (1−η)·θ_u(previous)`.
Measured on the digits (BENCHMARKS.md): the paper's `α = 4` works once the retain consistency
weight is high enough. With `γ = 1` the memorization step also improves what the digits share, and
stepping away from it costs the other digits 10 points; `γ = 10` halves that, `γ = 30` keeps them
within 2 points (UA 96%). Larger `α` falls off a cliff (`γ = 10`, `α = 8`: 41% retained).
Those sweeps ran on the digits model shipped with erase 0.1.0. On 0.2.0's retrained model (better
trained, warm-up EMA) the same defaults do not erase (UA 3% and 7% over two seeds at 100 steps),
and lr 3e-4 does worse (UA 12%, retained 94%): memorizing digits the model already fits well moves
the weights too little for the extrapolation to remove them. A sweep over lr 3e-4 to 1e-3, γ 100
and 300 and α 2 and 4 found no setting that erases before it breaks the model (BENCHMARKS.md
section 1): at lr 1e-3 UA reaches 95% with 11% of the other digits left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import field
from .base import Method, MethodConfig
from .losses import mse, predict, reference_prediction


@dataclass
class MOXConfig(MethodConfig):
    lr: float = field(1e-4, "AdamW learning rate of the memorization model (paper: 1e-5; digits: 1e-4, see BENCHMARKS.md)")
    weight_decay: float = field(0.01, "AdamW weight decay (paper: 0.01)")
    alpha: float = field(4.0, "extrapolation factor α in θ_0 + α(θ_0 − θ_m) (paper: 4, swept 0.5-8)")
    gamma: float = field(30.0, "weight of the retain consistency term while memorizing (digits: 30, see the "
                               "module docstring)")
    momentum: float = field(0.0, "η of the momentum variant (paper: 0.675); 0 extrapolates once at the end")

    def __post_init__(self):
        super().__post_init__()
        if self.alpha <= 0 or self.gamma < 0:
            raise ValueError(f"alpha must be positive and gamma non-negative, got {self.alpha}, {self.gamma}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")


class MOX(Method):
    name = "mox"
    Config = MOXConfig

    def setup(self):
        self.ref = self.model.frozen_copy()
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        self.theta_u = None  # the momentum average, once the first step has made one

    def loss(self, batch):
        f, r = batch.forget, batch.retain
        target_r = reference_prediction(self.model, self.ref, r)
        pred_f, pred_r = predict(self.model, f, r)
        memorize, keep = mse(pred_f, f.target), mse(pred_r, target_r)
        return memorize + self.config.gamma * keep, {"memorize": memorize.detach(), "consistency": keep.detach()}

    @torch.no_grad()
    def extrapolated(self) -> dict[str, torch.Tensor]:
        a = self.config.alpha
        return {n: self.theta0[n] + a * (self.theta0[n] - p) for n, p in self.params.items()}

    def step(self, batch, ctx):
        logs = super().step(batch, ctx)
        if self.config.momentum > 0:
            new, eta = self.extrapolated(), self.config.momentum
            self.theta_u = new if self.theta_u is None else {
                n: eta * new[n] + (1 - eta) * self.theta_u[n] for n in new}
        return logs

    @torch.no_grad()
    def finish(self):
        final = self.theta_u if self.theta_u is not None else self.extrapolated()
        for n, p in self.params.items():
            p.copy_(final[n])

    def state_dict(self):
        return ({f"theta_u.{n}": v for n, v in self.theta_u.items()} if self.theta_u else {}), {}

    def load_state_dict(self, tensors, meta):
        if tensors:
            device = next(iter(self.params.values())).device
            self.theta_u = {n: tensors[f"theta_u.{n}"].to(device) for n in self.params}
