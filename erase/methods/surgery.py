"""Explicit unilateral gradient surgery: the exact step that EUPMU (Zhou et al., arXiv 2510.22124) approximates.

Two backward passes per step give `g_f = ∇L_f` (`remap`, forget → anchor) and `g_r = ∇L_r`
(`denoise`, retain). The step follows `g_f + λ* g_r` with `λ* = max(0, (−⟨g_r, g_f⟩ − ε) / ‖g_r‖²)`:
the direction closest to the forget gradient along which the retain loss rises by at most `ε` to
first order. It is the baseline for EUPMU's cost and quality, so it remaps to the same target as
`eupmu` (the frozen reference's anchor prediction by default; measured on the digits, remapping to
the trained model's own anchor prediction let the model stop using the class label: 9% retained).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import field
from .base import Method, MethodConfig
from .losses import anchor_target, mse, predict


@dataclass
class SurgeryConfig(MethodConfig):
    lr: float = field(1e-4, "Adam learning rate (as eupmu)")
    eps: float = field(0.0, "allowed first-order rise of the retain loss per step, ε")
    target: str = field("reference", "anchor prediction the forget condition is remapped to: reference (frozen "
                                     "original model, as eupmu) or current (the trained model, as rl)",
                        choices=("reference", "current"))


class Surgery(Method):
    name = "surgery"
    Config = SurgeryConfig

    def setup(self):
        self.ref = self.model.frozen_copy() if self.config.target == "reference" else None

    def step(self, batch, ctx):
        f, r = batch.forget, batch.retain
        target = anchor_target(self.model, f, self.ref)
        pred_f, pred_r = predict(self.model, f, r)
        forget, retain = mse(pred_f, target), mse(pred_r, r.target)
        # Both backward passes run through the joint forward graph; that is the cost EUPMU avoids.
        g_f = ctx.grads(forget, retain_graph=True)
        g_r = ctx.grads(retain)
        # λ* comes from the gradients of the joint batch: both are averaged over the processes first
        # (one collective), so that N processes take the step one process with the joint batch takes.
        joint = ctx.reduce_mean(g_f + g_r)
        g_f, g_r = joint[:len(g_f)], joint[len(g_f):]
        dot = sum((a * b).sum() for a, b in zip(g_r, g_f))
        norm2 = sum((b * b).sum() for b in g_r)
        lam = torch.clamp((-dot - self.config.eps) / norm2.clamp_min(1e-20), min=0.0)
        ctx.set_grads([a + lam * b for a, b in zip(g_f, g_r)], reduced=True)
        ctx.optimizer_step()
        return {"remap": forget.detach(), "retain": retain.detach(), "lambda": lam.detach()}
