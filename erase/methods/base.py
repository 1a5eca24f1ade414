"""What every method shares: the common config fields, the step's batch, and the `Method` base class.

A method supplies `loss(batch)`, returning the loss and the values to log (detached tensors, which
the loop reads from the device only every few steps); the loop in `erase.unlearn` does the rest (data, noise, optimizer,
mixed precision, clipping, checkpoints, NaN guard). A method overrides `step` only when its
algorithm is not "one loss, one backward, one optimizer step", and `finish` when the final weights
are not the trained ones.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from ..config import field
from ..noising import Noised


@dataclass
class MethodConfig:
    """Fields every method has. A method's config subclasses this and redeclares the defaults it changes.

    What a recipe adds around a method (a retain term, a robustness term, a weight average) is not a
    config field but a term of the stage (`erase.unlearning.terms`), checked against the method.
    """

    steps: int = field(100, "optimizer steps (measured on the digits model, see BENCHMARKS.md)")
    lr: float = field(1e-4, "learning rate")
    batch_size: int = field(64, "images per step; methods with a forget and a retain term draw half of each, "
                                "so every method sees the same number of images per step")
    weight_decay: float = field(0.0, "AdamW weight decay (0 is Adam)")
    grad_clip: float = field(1.0, "clip the gradient norm to this value (0 disables)")
    params: str | None = field(None, "parameter group to train (default: the method's preferred group that "
                                     "exists on the backbone, see `erase methods`)")
    lora_rank: int = field(0, "train a LoRA adapter of this rank (through PEFT) on the Linear and Conv2d layers of "
                              "the parameter group instead of the weights themselves; 0 trains the full weights "
                              "(erase/lora.py)")
    lora_alpha: float | None = field(None, "LoRA scale numerator: the adapter adds (alpha / rank) B A (default: "
                                           "the rank, scale 1)")
    antithetic: bool = field(False, "draw timesteps in pairs t, T-1-t within a batch (SA / SalUn)")
    seed: int = field(0, "seed of every batch, noise and timestep draw")
    checkpoint_every: int = field(100, "write a resumable checkpoint every this many steps")
    gradient_checkpointing: bool = field(False, "recompute UNet activations in the backward pass: less memory "
                                                "(SD at 512 px on one GPU), slower steps")
    mixed_precision: str = field("auto", "auto (bf16 on a GPU that has it, else fp32), no or bf16; fp16 is not "
                                         "offered because surgery, lur and eupmu do gradient algebra that a loss "
                                         "scaler would corrupt", choices=("auto", "no", "bf16"))

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be non-negative")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be 0 (full weights) or a positive rank, got {self.lora_rank}")
        if self.lora_alpha is not None and not (self.lora_rank and self.lora_alpha > 0):
            raise ValueError("lora_alpha needs a LoRA (--lora-rank R) and must be positive")


@dataclass
class Batch:
    """One step's data: noised forget samples (with their anchors) and noised retain samples."""

    forget: Noised | None
    retain: Noised | None
    step: int


class StepContext:
    """What a method's `step` may do besides computing losses: backward, and one optimizer step."""

    def __init__(self, accelerator, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 grad_clip: float):
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.params = params
        self.grad_clip = grad_clip
        self._reduced = False  # set_grads(..., reduced=True): the next step's gradients need no all-reduce

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def grads(self, loss: torch.Tensor, retain_graph: bool = False) -> list[torch.Tensor]:
        """∇loss for each trainable parameter (zeros where the loss does not reach one)."""
        gs = torch.autograd.grad(loss, self.params, retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, self.params)]

    def set_grads(self, grads: list[torch.Tensor], reduced: bool = False) -> None:
        """Use `grads` for the next optimizer step; `reduced`: they are already means over processes."""
        for p, g in zip(self.params, grads):
            p.grad = g
        self._reduced = reduced

    def reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Means over the data-parallel processes, in one collective: the tensors travel as one flat buffer."""
        if self.accelerator.num_processes == 1 or not tensors:
            return tensors
        flat = self.accelerator.reduce(torch.cat([t.reshape(-1) for t in tensors]), reduction="mean")
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A per-process batch mean (detached) as the mean over every process's batch.

        The processes draw equal batches, so the mean of their means is the mean over the joint
        batch: a method that uses a loss's value (eupmu's log L, its dual step) gets the number one
        process with the joint batch would get.
        """
        return self.reduce_mean([value.detach().float()])[0]

    def optimizer_step(self) -> None:
        """Average gradients over processes (one flat all-reduce), clip, step, clear. Every method steps here."""
        if not self._reduced:
            with_grad = [p for p in self.params if p.grad is not None]
            for p, g in zip(with_grad, self.reduce_mean([p.grad for p in with_grad])):
                p.grad = g
        self._reduced = False
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Method:
    """Base class. Subclasses set `name`, `Config`, `forget_share` and `params_preference`, and write `loss`."""

    name: str = ""
    Config: type = MethodConfig
    # Fraction of each batch drawn from the forget set (the rest from the retain set).
    forget_share: float = 0.5
    # Parameter groups in order of preference; the first one the backbone has is the default.
    params_preference: tuple[str, ...] = ("all",)

    def __init__(self, model, config: MethodConfig, data, params: dict[str, torch.nn.Parameter]):
        self.model = model
        self.config = config
        self.data = data
        self.params = params

    @classmethod
    def paper(cls) -> str:
        """The first line of the method module's docstring: the paper and its arXiv id."""
        return (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]

    @classmethod
    def forget_share_for(cls, config: MethodConfig) -> float:
        """The forget share of each batch under `config` (a method with an optional retain term changes it)."""
        return cls.forget_share

    @classmethod
    def params_preference_for(cls, model) -> tuple[str, ...]:
        """Parameter groups to try in order when `params` is unset (the first the backbone has wins)."""
        return cls.params_preference

    @classmethod
    def params_description(cls) -> str:
        """The default parameter group in words, for `erase methods`."""
        return f"first of {', '.join(cls.params_preference)} that the backbone has"

    @classmethod
    def default_lr(cls, group: str, model) -> float:
        """The learning rate for a parameter group of `model` when the config leaves `lr` unset (None)."""
        raise NotImplementedError(f"{cls.name} has no default learning rate: set lr")

    def setup(self) -> None:
        """Work done once on the original weights, before a resume restores later ones."""

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        raise NotImplementedError

    def step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor | float]:
        loss, logs = self.loss(batch)
        ctx.backward(loss)
        ctx.optimizer_step()
        return logs

    def lr_scale(self, step: int) -> float:
        """Multiplier of the learning rate at `step` (constant unless the paper decays it)."""
        return 1.0

    def finish(self) -> None:
        """Turn the trained weights into the unlearned ones (only `mox` does something here)."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Method state a resume needs besides weights and optimizer: (tensors, JSON values)."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass
