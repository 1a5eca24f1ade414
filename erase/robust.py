"""Robust erasure in the manner of AdvUnlearn (Zhang et al., arXiv 2405.15234): a stage's robustness term.

With a robustness term (`erase.unlearning.terms.RobustTerm`; formerly `--adversarial-every K`) the
loop keeps an adversarial perturbation δ of the forget condition: every K steps an inner attack
refreshes it (`steps` Adam steps, warm-started from the
last δ, minimising the current model's denoising loss on the step's forget images under the
condition + δ: the nearby condition that brings the concept back best), and every other step runs
the method with the forget condition read as condition + δ by the trained denoiser, so the outer step
unlearns the adversarial condition as well as (on the other steps) the plain one. Unbounded, δ can
wander to a condition far from the concept's (`--adversarial-radius R` keeps each row of δ within R
times the norm of the condition's row, projected after every inner step as PGD does). Frozen reference
copies (ESD's and EUPMU's targets) still see the plain condition, and the method's retain term keeps
what it keeps. The condition is the class-embedding vector on the class-conditional DDPM and the
text sequence embedding (tokens x width) on SD, SDXL and SD3 (their pooled text stays plain),
perturbed through the backbones' `override_condition` hook.

Only weights past the condition can learn from the adversarial steps: the class-embedding row that
ESD trains on the DDPM is replaced, not read, while δ is applied, so robust erasure wants a UNet
group (`--params all`, `noattn`, `xattn`). δ and its Adam state are part of a stage's checkpoints
(`state_dict`), so a resumed robust run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .backbones.base import Condition
from .checkpoint import flatten_optimizer_state, restore_optimizer_state
from .noising import Noised
from .utils import step_generator

ADVERSARIAL_STREAM = 1 << 42  # the inner attack's noise, apart from the loop's and the methods' draws


class AdversarialCondition:
    """δ and the inner attack that refreshes it; `applied(step, forget)` wraps one step of the method."""

    def __init__(self, model, every: int, steps: int, lr: float, seed: int, radius: float | None = None):
        self.model, self.every, self.steps, self.lr, self.seed, self.radius = model, every, steps, lr, seed, radius
        self.delta: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.refreshes = 0

    @contextlib.contextmanager
    def _perturbed(self, cond: Condition, delta: torch.Tensor):
        with contextlib.ExitStack() as stack:
            for match, plain in self.model.condition_vectors(cond):
                stack.enter_context(self.model.override_condition(match, plain.detach() + delta))
            yield

    def refresh(self, forget: Noised, step: int) -> float:
        """A few attack steps on δ against the current weights; returns the last inner loss."""
        plain = self.model.condition_vectors(forget.cond)[0][1].detach()
        if self.delta is None:
            self.delta = torch.zeros(plain.shape, device=forget.x0.device, requires_grad=True)
            self.optimizer = torch.optim.Adam([self.delta], lr=self.lr)
        for i in range(self.steps):
            g = step_generator(self.seed, ADVERSARIAL_STREAM, step, i)
            noise = torch.randn(forget.x0.shape, generator=g).to(forget.x0)
            t = self.model.draw_timesteps(len(forget.x0), g).to(forget.x0.device)
            target = self.model.training_target(forget.x0, noise, t)
            with torch.enable_grad(), self._perturbed(forget.cond, self.delta):
                prediction = self.model.predict(self.model.add_noise(forget.x0, noise, t), t, forget.cond)
                loss = F.mse_loss(prediction.float(), target.float())
                # Only δ's gradient: the model's weights keep theirs for the outer step.
                (self.delta.grad,) = torch.autograd.grad(loss, [self.delta])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.radius is not None:  # back onto the ball: each row within radius x its plain norm
                with torch.no_grad():
                    bound = self.radius * plain.norm(dim=-1, keepdim=True)
                    self.delta.mul_((bound / self.delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1))
        self.refreshes += 1
        return float(loss.detach())

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """δ and its inner optimizer's state, for a checkpoint (nothing before the first refresh)."""
        if self.delta is None:
            return {}, {}
        adam, adam_meta = flatten_optimizer_state(self.optimizer)
        return ({"delta": self.delta.detach(), **{f"adam.{k}": v for k, v in adam.items()}},
                {"optimizer": adam_meta, "refreshes": self.refreshes})

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if "delta" not in tensors:
            return
        device = self.model.device
        self.delta = tensors["delta"].to(device).clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.delta], lr=self.lr)
        adam = {k.removeprefix("adam."): v.to(device) for k, v in tensors.items() if k.startswith("adam.")}
        restore_optimizer_state(self.optimizer, adam, meta["optimizer"])
        self.refreshes = meta["refreshes"]

    @contextlib.contextmanager
    def applied(self, step: int, forget: Noised | None):
        """Odd steps run under condition + δ (refreshed every `every` adversarial steps); even ones plain."""
        if forget is None or step % 2 == 0:
            yield
            return
        if self.delta is None or (step // 2) % self.every == 0:
            self.refresh(forget, step)
        with self._perturbed(forget.cond, self.delta.detach()):
            yield
