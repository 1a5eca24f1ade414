"""SalUn: saliency unlearning (Fan et al., ICLR 2024, arXiv 2310.12508).

`rl` restricted to the weights that matter most for the forget data: the mask keeps the entries
whose saliency over the forget set is in the top `mask_ratio`, by one global threshold, and every
step zeroes the other gradients (Adam then leaves them untouched).

The saliency (`saliency`):
- `authors`, SalUn's code: `|Σ_b g_b|`, the absolute value of the gradient summed over all forget
  batches `b`, where `g_b = ∇ ‖ε − ε̃_θ(x_t, t, c_f)‖²` is taken on the classifier-free guided
  prediction `ε̃ = ε_θ(∅) + s(ε_θ(c_f) − ε_θ(∅))` (`s = 3`, their `w = 2`, on the DDPM; 7.5 on Stable
  Diffusion) and clipped to norm `grad_clip` before it is added.
- `conditional` (the default here, ours): `Σ_b |∇ denoise(forget)|`, batch by batch on the
  conditional prediction, no clipping. On the digits (seed 0) the two masks share 0.685 of their
  weights, less than the authors' saliency shares between seeds 0 and 1 (0.739; ours: 0.816), so
  the choice changes which weights SalUn trains (docs/methods.md has the commands).
The retain weight `alpha` is `rl`'s: 3 is SalUn's DDPM weight on a mean loss; their Stable
Diffusion nudity script weighs mean losses with 0.1 (pass `--alpha 0.1` there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import field
from ..utils import step_generator
from .losses import denoise, mse, noised
from .rl import RL, RLConfig

MASK_STREAM = 1 << 40  # an index no training step uses, so the mask's draws are its own


@dataclass
class SalUnConfig(RLConfig):
    lr: float = field(5e-4, "Adam learning rate (digits: 5e-4 kept more than 1e-4, see BENCHMARKS.md)")
    mask_ratio: float = field(0.5, "fraction of weights kept trainable (SalUn: 0.5)")
    mask_batch_size: int = field(64, "forget images per batch while accumulating the saliency")
    saliency: str = field("conditional", "how the saliency is accumulated over the forget batches: conditional "
                                         "(ours: sum of |grad| of the conditional prediction's loss, batch by batch) "
                                         "or authors (SalUn's code: |sum of grad| of the guided prediction's loss, "
                                         "each batch's gradient clipped to --grad-clip); the module docstring has "
                                         "the measured overlap", choices=("conditional", "authors"))
    saliency_guidance: float | None = field(None, "saliency authors: guidance scale s of the guided prediction "
                                                  "(default: SalUn's, 3 (w = 2) on class-conditional backbones, 7.5 "
                                                  "on text-conditioned ones)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.mask_batch_size < 1:
            raise ValueError(f"mask_batch_size must be at least 1, got {self.mask_batch_size}")
        if self.saliency_guidance is not None and self.saliency_guidance <= 0:
            raise ValueError(f"saliency_guidance must be positive, got {self.saliency_guidance}")


class SalUn(RL):
    name = "salun"
    Config = SalUnConfig

    def setup(self):
        """Saliency of the original weights over the whole forget set (one pass, fixed draws)."""
        names = list(self.params)
        saliency = {n: torch.zeros_like(p) for n, p in self.params.items()}
        x0, cond = self.data.forget_x0, self.data.forget_cond
        g = step_generator(self.config.seed, MASK_STREAM)
        authors = self.config.saliency == "authors"
        for start in range(0, len(x0), self.config.mask_batch_size):
            b = noised(self.model, x0[start:start + self.config.mask_batch_size],
                       cond[start:start + self.config.mask_batch_size], g)
            loss = self.guided_loss(b) if authors else denoise(self.model, b)
            grads = torch.autograd.grad(loss, [self.params[n] for n in names], allow_unused=True)
            grads = [torch.zeros_like(self.params[n]) if gr is None else gr for n, gr in zip(names, grads)]
            if authors and self.config.grad_clip > 0:
                norm = torch.sqrt(sum((gr.float() ** 2).sum() for gr in grads))
                grads = [gr * (self.config.grad_clip / (norm + 1e-6)).clamp(max=1.0) for gr in grads]
            for n, gr in zip(names, grads):
                saliency[n] += gr if authors else gr.abs()
        if authors:
            saliency = {n: s.abs() for n, s in saliency.items()}
        flat = torch.cat([s.flatten() for s in saliency.values()])
        k = max(1, int(round(self.config.mask_ratio * flat.numel())))
        threshold = flat.kthvalue(flat.numel() - k + 1).values  # the k-th largest entry
        self.mask = {n: (s >= threshold).to(s.dtype) for n, s in saliency.items()}
        self.kept = sum(m.sum().item() for m in self.mask.values()) / flat.numel()

    def guided_loss(self, b):
        """`‖ε − ε̃_θ(x_t, t, c_f)‖²` on the classifier-free guided prediction, as SalUn's mask script."""
        s = self.config.saliency_guidance
        if s is None:
            s = 3.0 if self.model.condition_kind == "class" else 7.5
        return mse(self.model.guided_prediction(b.x_t, b.t, b.cond, s).float(), b.target)

    def step(self, batch, ctx):
        loss, logs = self.loss(batch)
        ctx.backward(loss)
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.mask[n])
        ctx.optimizer_step()
        return logs
