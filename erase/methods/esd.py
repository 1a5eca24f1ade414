"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023, arXiv 2303.07345).

`neg_guidance`: the forget condition is trained to predict the reference model's negatively guided
noise `ε_0(∅) − η(ε_0(c_f) − ε_0(∅))`, so sampling with it steers away from the concept (the paper's
form; the authors' current script writes `ε_0(c_f) − η'(ε_0(c_f) − ε_0(∅))`, the same target at
`η = η' − 1`, so its default `η' = 2` is `η = 1` here). No retain
term in the paper; `retain_weight` > 0 adds AdvUnlearn's utility term (keep the original's
predictions on the retain conditions, half of each batch), which ESD needs where erasing one text
concept drags its neighbours along (the flow miniature, BENCHMARKS.md section 10).
ESD-u trains everything but where the condition enters (`nocondition`, on SD everything but
cross-attention, for broad concepts), ESD-x only where it enters (`condition`, SD's cross-attention,
for a specific concept). The default is ESD-u on text-conditioned backbones. **[adaptation]** a
class-conditional DDPM's condition enters through its class embedding, so ESD trains `condition`
there, ESD-x's counterpart for one class.
Measured on the digits (BENCHMARKS.md): with `all` weights ESD forgets the digit but keeps only 83%
of the others at any learning rate from 5e-5 to 2e-4 (it has no retain term); with `class-emb` it
forgets (UA 99%) and the other digits are untouched. An embedding row moves ~lr per Adam step and
is ~1 from its neighbours, so that group needs a far larger learning rate than UNet weights.
`x_t` comes from one of two places (`xt`): `sample`, ESD's own: the current model DDIM-samples
from fresh noise on the forget condition (guidance `start_guidance`) down to a random one of
`sample_steps` steps, so no images are needed (costs up to `sample_steps` guided forwards per step);
or `cached` (default, cheaper): the forget images (real ones for a class, the cached generated ones
for a text concept) noised to a random timestep. **[adaptation]**: `cached` is our addition, a
cheaper option than ESD's sampling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import field
from ..utils import step_generator
from .base import Method, MethodConfig
from .losses import mse, neg_guidance, neg_guidance_target, predict, reference_prediction

SAMPLE_STREAM = 1 << 41  # the x_t sampler's own random stream, separate from the loop's draws


@dataclass
class ESDConfig(MethodConfig):
    lr: float | None = field(None, "Adam learning rate (default: 5e-2 for a class embedding, 2e-4 for network weights, "
                                   "measured on the digits; paper, SD 1.x: 1e-5; authors' script: 5e-5)")
    eta: float = field(1.0, "negative guidance scale η of ε_0(∅) − η(ε_0(c) − ε_0(∅)) (paper: 1). The authors' "
                            "current script writes the target ε_0(c) − η'(ε_0(c) − ε_0(∅)), so its η' = 2 is "
                            "η = 1 here (η = η' − 1); passing 2 here doubles the guidance")
    xt: str = field("cached", "where x_t comes from: cached (noised forget images) or sample (ESD's own: "
                              "partial DDIM sampling of the current model on the forget condition)",
                    choices=("cached", "sample"))
    sample_steps: int = field(50, "xt=sample: DDIM steps of the sampler (ESD: 50)")
    start_guidance: float = field(3.0, "xt=sample: guidance scale of the sampler (ESD: 3)")
    retain_weight: float = field(0.0, "weight of a retain term that keeps the retain conditions' predictions "
                                      "those of the original (AdvUnlearn's utility term added to ESD, arXiv "
                                      "2405.15234); 0 is the paper's ESD, forget samples only; above 0 half of "
                                      "each batch is retain samples")

    def __post_init__(self):
        super().__post_init__()
        if self.eta <= 0:
            raise ValueError(f"eta must be positive, got {self.eta}")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight must be non-negative (0 turns the retain term off), got {self.retain_weight}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be at least 1, got {self.sample_steps}")


class ESD(Method):
    name = "esd"
    Config = ESDConfig
    forget_share = 1.0

    @classmethod
    def forget_share_for(cls, config) -> float:
        return 0.5 if config.retain_weight > 0 else cls.forget_share

    @classmethod
    def params_preference_for(cls, model) -> tuple[str, ...]:
        # A class id enters through one embedding row: ESD-x's counterpart. Text enters everywhere: ESD-u.
        return ("condition",) if model.condition_kind == "class" else ("nocondition", "all")

    @classmethod
    def params_description(cls) -> str:
        return "condition on class-conditional backbones, nocondition (ESD-u) on text-conditioned ones"

    @classmethod
    def default_lr(cls, group: str, model) -> float:
        trains_embedding = model.condition_kind == "class" and model.GROUP_ALIASES.get(group, group) == "condition"
        return 5e-2 if trains_embedding else 2e-4

    def setup(self):
        self.ref = self.model.frozen_copy()

    def loss(self, batch):
        forget = batch.forget
        if self.config.xt == "sample":
            g = step_generator(self.config.seed, SAMPLE_STREAM, batch.step)
            stop = int(torch.randint(self.config.sample_steps, (1,), generator=g))
            x_t, t = self.model.partial_sample(forget.cond, g, self.config.sample_steps, stop,
                                               self.config.start_guidance)
            # Only x_t, t and the condition enter the loss; the cached draw's x0 and noise are unused.
            forget = dataclasses.replace(forget, x_t=x_t, t=t)
        if not self.config.retain_weight:
            loss = neg_guidance(self.model, self.ref, forget, self.config.eta)
            return loss, {"esd": loss.detach()}
        target_f = neg_guidance_target(self.model, self.ref, forget, self.config.eta)
        target_r = reference_prediction(self.model, self.ref, batch.retain)
        pred_f, pred_r = predict(self.model, forget, batch.retain)  # one network call for both
        esd, keep = mse(pred_f, target_f), mse(pred_r, target_r)
        return esd + self.config.retain_weight * keep, {"esd": esd.detach(), "retain": keep.detach()}
