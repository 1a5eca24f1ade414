"""A noised batch: the samples every training step of every method is computed on.

`Noised` sits below the data layer (which draws it) and the methods (which compute losses on it), so
neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbones.base import Condition
from .utils import to_device


@dataclass
class Noised:
    """Clean samples, their conditions, one draw of timesteps and noise, `x_t = add_noise(x0, noise, t)`,
    and the training target there (`training_target(x0, noise, t)`: ε, v or the flow velocity)."""

    x0: torch.Tensor
    cond: Condition
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    target: torch.Tensor
    anchor: Condition | None = None  # the anchor condition of each forget sample
    concept: torch.Tensor | None = None  # which erased concept each forget sample shows (several erased at once)


def noised(model, x0: torch.Tensor, cond: Condition, g: torch.Generator, antithetic: bool = False,
           anchor: Condition | None = None) -> Noised:
    """Draw timesteps (`model.draw_timesteps`) and `noise ~ N(0, I)` from `g` (on the CPU, so draws do
    not depend on the device). `antithetic` pairs each timestep with its mirror, as SA and SalUn do."""
    t = model.draw_timesteps(len(x0), g, antithetic)
    noise = to_device(torch.randn(x0.shape, generator=g).to(x0.dtype), x0.device)
    t = to_device(t, x0.device)
    return Noised(x0, cond, noise, t, model.add_noise(x0, noise, t), model.training_target(x0, noise, t), anchor)
