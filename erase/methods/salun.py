"""SalUn: saliency unlearning (Fan et al., ICLR 2024, arXiv 2310.12508).

`rl` restricted to the weights that matter most for the forget data: the mask keeps the entries
whose saliency over the forget set is in the top `mask_ratio`, by one global threshold, and every
step zeroes the other gradients (Adam then leaves them untouched).

The saliency (`saliency`), over the forget set in batches `b` of `mask_batch_size`:
- `conditional` (the default here, ours): `Σ_b |∇ denoise(forget)|`, the gradient of the mean
  loss of the conditional prediction, batch by batch, no clipping.
- `authors-ddpm`, SalUn's DDPM script: `Σ_b |clip(g_b)|`, where `g_b` is the gradient of the loss
  summed over pixels of the classifier-free guided prediction `(1 + w)ε_θ(c_f) − wε_θ(∅)` (`w = 2`,
  i.e. `s = 3`), clipped to norm `grad_clip` before its absolute value is added.
- `authors-sd`, SalUn's Stable Diffusion script: `|Σ_b g_b|`, the absolute value of the gradient
  summed over all batches, of the mean loss of the guided prediction at `w = 7.5` (`s = 8.5`), no
  clipping.
Not reproduced from those scripts (declared here): the DDPM script also takes an optimizer step
after each mask batch, so its later batches see moved weights; and both select the entries whose
ascending rank is below half the count, which as written keeps the lower half of the saliency,
whereas the paper and this method keep the top `mask_ratio`.
On the digits (seed 0, one step, so the trained weights are the mask) the default mask shares 0.736
of its weights with `authors-ddpm`'s and 0.651 with `authors-sd`'s, where a change of seed keeps
0.76-0.82 in every mode (docs/methods.md has the commands).
The retain weight `alpha` is `rl`'s: 3 is SalUn's DDPM weight on a mean loss; their Stable
Diffusion nudity script weighs mean losses with 0.1 (pass `--alpha 0.1` there).
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
    saliency: str = field("conditional", "how the saliency is accumulated over the forget batches: conditional "
                                         "(ours: sum over batches of |grad| of the conditional prediction's mean "
                                         "loss), authors-ddpm (SalUn's DDPM script: sum of |grad| of the guided "
                                         "prediction's pixel-summed loss, each batch's gradient clipped to "
                                         "--grad-clip) or authors-sd (SalUn's SD script: |sum of grad| of the guided "
                                         "prediction's mean loss); see the module docstring",
                          choices=("conditional", "authors-ddpm", "authors-sd"))
    saliency_guidance: float | None = field(None, "authors saliency modes: guidance scale s of the guided prediction "
                                                  "eps(null) + s (eps(c) - eps(null)) (default: the script's, s = 1 + w: "
                                                  "3 for authors-ddpm, 8.5 for authors-sd)")

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
        mode = self.config.saliency
        for start in range(0, len(x0), self.config.mask_batch_size):
            b = noised(self.model, x0[start:start + self.config.mask_batch_size],
                       cond[start:start + self.config.mask_batch_size], g)
            loss = denoise(self.model, b) if mode == "conditional" else self.guided_loss(b)
            grads = torch.autograd.grad(loss, [self.params[n] for n in names], allow_unused=True)
            grads = [torch.zeros_like(self.params[n]) if gr is None else gr for n, gr in zip(names, grads)]
            if mode == "authors-ddpm" and self.config.grad_clip > 0:
                norm = torch.sqrt(sum((gr.float() ** 2).sum() for gr in grads))
                grads = [gr * (self.config.grad_clip / (norm + 1e-6)).clamp(max=1.0) for gr in grads]
            for n, gr in zip(names, grads):
                saliency[n] += gr if mode == "authors-sd" else gr.abs()
        if mode == "authors-sd":
            saliency = {n: s.abs() for n, s in saliency.items()}
        flat = torch.cat([s.flatten() for s in saliency.values()])
        k = max(1, int(round(self.config.mask_ratio * flat.numel())))
        threshold = flat.kthvalue(flat.numel() - k + 1).values  # the k-th largest entry
        self.mask = {n: (s >= threshold).to(s.dtype) for n, s in saliency.items()}
        self.kept = sum(m.sum().item() for m in self.mask.values()) / flat.numel()

    def guided_loss(self, b):
        """`‖ε − ε̃_θ(x_t, t, c_f)‖²` on the guided prediction, as SalUn's mask scripts: summed over pixels
        and averaged over the batch in the DDPM script, averaged over both in the SD one."""
        s = self.config.saliency_guidance
        if s is None:
            s = 3.0 if self.config.saliency == "authors-ddpm" else 8.5
        err = (self.model.guided_prediction(b.x_t, b.t, b.cond, s).float() - b.target.float()) ** 2
        return err.flatten(1).sum(1).mean() if self.config.saliency == "authors-ddpm" else err.mean()

    def step(self, batch, ctx):
        loss, logs = self.loss(batch)
        ctx.backward(loss)
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.mask[n])
        ctx.optimizer_step()
        return logs
