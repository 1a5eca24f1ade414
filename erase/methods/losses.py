"""The building blocks every method is made of (docs/methods.md, "Notation").

`ε_θ(x_t, t, c)` below stands for the backbone's prediction, whatever it parameterizes (the noise ε,
v-prediction's v, or the flow velocity ε − x0), and `ε` for the matching training target (`Noised.target`):
every loss here is a distance between predictions and targets, and every combination of
predictions is linear (guidance), so each means the same in all three parameterizations.

All losses are means over every element (pixels or latent entries) and over the batch, like
`F.mse_loss`. Where a paper summed over pixels, the method's weight is converted to this convention
(see `rl`), so that it means the same on every image size. A `Noised` batch carries its own noise and timesteps,
so a loss can be recomputed on exactly the same draw (EUPMU's dual update needs that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones.base import Condition
from ..noising import Noised, noised  # noqa: F401 - the methods' building blocks


def predict(model, *batches: Noised, denoiser=None) -> list[torch.Tensor]:
    """`ε_θ(x_t, t, c)` for several batches in one network call (conditions are joined row-wise by
    `Condition.cat`), split back per batch in float32.

    One call instead of one per batch is cheaper, and it is why `surgery`'s second backward pass
    costs a full pass over the joint graph while `eupmu` needs only one.
    """
    x_t = torch.cat([b.x_t for b in batches])
    t = torch.cat([b.t for b in batches])
    cond = Condition.cat([b.cond for b in batches])
    out = model.predict(x_t, t, cond, denoiser).float()
    return list(out.split([len(b.x_t) for b in batches]))


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target.float())


@torch.no_grad()
def anchor_target(model, b: Noised, denoiser=None) -> torch.Tensor:
    """`sg ε_θ(x_t, t, c_a)`: what the current model (or `denoiser`, e.g. the frozen reference) predicts
    for the anchor on the forget sample."""
    return model.predict(b.x_t, b.t, b.anchor, denoiser).float()


def denoise(model, b: Noised, denoiser=None) -> torch.Tensor:
    """`‖ε − ε_θ(x_t, t, c)‖²`: the ordinary training loss (L_simple), against the backbone's target."""
    return mse(predict(model, b, denoiser=denoiser)[0], b.target)


def remap(model, b: Noised, denoiser=None) -> torch.Tensor:
    """`‖ε_θ(x_t, t, c_f) − sg ε_θ(x_t, t, c_a)‖²`: make the forget condition predict what the anchor does."""
    return mse(predict(model, b, denoiser=denoiser)[0], anchor_target(model, b))


@torch.no_grad()
def neg_guidance_target(model, ref, b: Noised, eta: float) -> torch.Tensor:
    """ESD's target: the reference's negatively guided prediction `ε_0(∅) − η(ε_0(c_f) − ε_0(∅))`."""
    null = model.null_condition(len(b.x_t))
    # Both reference predictions in one network call, as batched classifier-free guidance does.
    e_null, e_cond = model.predict(torch.cat([b.x_t, b.x_t]), torch.cat([b.t, b.t]), Condition.cat([null, b.cond]),
                                   ref).float().chunk(2)
    return e_null - eta * (e_cond - e_null)


def neg_guidance(model, ref, b: Noised, eta: float) -> torch.Tensor:
    return mse(predict(model, b)[0], neg_guidance_target(model, ref, b, eta))


@torch.no_grad()
def reference_prediction(model, ref, b: Noised) -> torch.Tensor:
    return model.predict(b.x_t, b.t, b.cond, ref).float()


def consistency(model, ref, b: Noised) -> torch.Tensor:
    """`‖ε_θ(x_t, t, c_r) − sg ε_0(x_t, t, c_r)‖²`: keep retain predictions where the reference had them."""
    return mse(predict(model, b)[0], reference_prediction(model, ref, b))
