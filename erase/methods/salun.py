"""SalUn: saliency unlearning (Fan et al., ICLR 2024, arXiv 2310.12508).

`rl` restricted to the weights that matter most for the forget data: the mask keeps the entries
whose accumulated `|∇ denoise(forget)|` over the forget set is in the top `mask_ratio`, by one
global threshold, and every step zeroes the other gradients (Adam then leaves them untouched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import field
from ..utils import step_generator
from .losses import denoise, noised
from .rl import RL, RLConfig

MASK_STREAM = 1 << 40  # an index no training step uses, so the mask's draws are its own


@dataclass
class SalUnConfig(RLConfig):
    lr: float = field(5e-4, "Adam learning rate (digits: 5e-4 kept more than 1e-4, see BENCHMARKS.md)")
    mask_ratio: float = field(0.5, "fraction of weights kept trainable (SalUn: 0.5)")
    mask_batch_size: int = field(64, "forget images per batch while accumulating the saliency")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.mask_batch_size < 1:
            raise ValueError(f"mask_batch_size must be at least 1, got {self.mask_batch_size}")


class SalUn(RL):
    name = "salun"
    Config = SalUnConfig

    def setup(self):
        """Saliency of the original weights over the whole forget set (one pass, fixed draws)."""
        names = list(self.params)
        saliency = {n: torch.zeros_like(p) for n, p in self.params.items()}
        x0, cond = self.data.forget_x0, self.data.forget_cond
        g = step_generator(self.config.seed, MASK_STREAM)
        for start in range(0, len(x0), self.config.mask_batch_size):
            b = noised(self.model, x0[start:start + self.config.mask_batch_size],
                       cond[start:start + self.config.mask_batch_size], g)
            grads = torch.autograd.grad(denoise(self.model, b), [self.params[n] for n in names], allow_unused=True)
            for n, gr in zip(names, grads):
                if gr is not None:
                    saliency[n] += gr.abs()
        flat = torch.cat([s.flatten() for s in saliency.values()])
        k = max(1, int(round(self.config.mask_ratio * flat.numel())))
        threshold = flat.kthvalue(flat.numel() - k + 1).values  # the k-th largest entry
        self.mask = {n: (s >= threshold).to(s.dtype) for n, s in saliency.items()}
        self.kept = sum(m.sum().item() for m in self.mask.values()) / flat.numel()

    def step(self, batch, ctx):
        loss, logs = self.loss(batch)
        ctx.backward(loss)
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.mask[n])
        ctx.optimizer_step()
        return logs
