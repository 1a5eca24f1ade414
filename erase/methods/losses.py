"""The building blocks every method is made of (docs/methods.md, "Notation").

All losses are means over every element (pixels or latent entries) and over the batch, like
`F.mse_loss`. Where a paper summed over pixels, the method's weight is converted to this convention
(see `rl`), so that it means the same on every image size. A `Noised` batch carries its own noise and timesteps,
so a loss can be recomputed on exactly the same draw (EUPMU's dual update needs that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..utils import to_device


@dataclass
class Noised:
    """Clean samples, their conditions, and one draw of timesteps and noise: `x_t = add_noise(x0, ε, t)`."""

    x0: torch.Tensor
    cond: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    anchor: torch.Tensor | None = None  # the anchor condition of each forget sample


def noised(model, x0: torch.Tensor, cond: torch.Tensor, g: torch.Generator, antithetic: bool = False,
           anchor: torch.Tensor | None = None) -> Noised:
    """Draw `t ~ U{0..T-1}` and `ε ~ N(0, I)` from `g` (on the CPU, so draws do not depend on the device).

    `antithetic` pairs `t` with `T-1-t` inside the batch, as SA and SalUn do, to lower the variance.
    """
    n, T = len(x0), model.num_train_timesteps
    if antithetic:
        half = torch.randint(T, ((n + 1) // 2,), generator=g)
        t = torch.cat([half, T - 1 - half])[:n]
    else:
        t = torch.randint(T, (n,), generator=g)
    noise = to_device(torch.randn(x0.shape, generator=g).to(x0.dtype), x0.device)
    t = to_device(t, x0.device)
    return Noised(x0, cond, noise, t, model.add_noise(x0, noise, t), anchor)


def predict(model, *batches: Noised, unet=None) -> list[torch.Tensor]:
    """`ε_θ(x_t, t, c)` for several batches in one UNet call (conditions are joined along the first
    dimension only, so class ids and text embeddings both work), split back per batch in float32.

    One call instead of one per batch is cheaper, and it is why `surgery`'s second backward pass
    costs a full pass over the joint graph while `eupmu` needs only one.
    """
    x_t = torch.cat([b.x_t for b in batches])
    t = torch.cat([b.t for b in batches])
    cond = torch.cat([b.cond for b in batches])
    out = model.predict_noise(x_t, t, cond, unet).float()
    return list(out.split([len(b.x_t) for b in batches]))


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target.float())


@torch.no_grad()
def anchor_target(model, b: Noised, unet=None) -> torch.Tensor:
    """`sg ε_θ(x_t, t, c_a)`: what the current model (or `unet`, e.g. the frozen reference) predicts
    for the anchor on the forget sample."""
    return model.predict_noise(b.x_t, b.t, b.anchor, unet).float()


def denoise(model, b: Noised, unet=None) -> torch.Tensor:
    """`‖ε − ε_θ(x_t, t, c)‖²`: the ordinary training loss (L_simple)."""
    return mse(predict(model, b, unet=unet)[0], b.noise)


def remap(model, b: Noised, unet=None) -> torch.Tensor:
    """`‖ε_θ(x_t, t, c_f) − sg ε_θ(x_t, t, c_a)‖²`: make the forget condition predict what the anchor does."""
    return mse(predict(model, b, unet=unet)[0], anchor_target(model, b))


@torch.no_grad()
def sample_to_step(model, cond: torch.Tensor, g: torch.Generator, steps: int, stop: int,
                   guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ESD's `x_t`: DDIM-sample the current model on `cond` (with classifier-free guidance) from
    fresh noise for `stop` of `steps` steps; returns `x_t` and its training timestep `t` per sample."""
    from diffusers import DDIMScheduler

    n = len(cond)
    sampler = DDIMScheduler.from_config(model.scheduler.config)
    sampler.set_timesteps(steps)
    device = model.device
    x = model.initial_noise(torch.randint(2**62, (n,), generator=g).tolist()).to(device)
    null = model.null_condition(n)
    for t in sampler.timesteps[:stop]:
        tt = t.to(device).expand(n)
        eps_c, eps_u = model.predict_noise(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, null])).chunk(2)
        x = sampler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x, sampler.timesteps[stop].to(device).expand(n)


@torch.no_grad()
def neg_guidance_target(model, ref, b: Noised, eta: float) -> torch.Tensor:
    """ESD's target: the reference's negatively guided prediction `ε_0(∅) − η(ε_0(c_f) − ε_0(∅))`."""
    null = model.null_condition(len(b.x_t))
    # Both reference predictions in one UNet call, as batched classifier-free guidance does.
    e_null, e_cond = model.predict_noise(torch.cat([b.x_t, b.x_t]), torch.cat([b.t, b.t]), torch.cat([null, b.cond]),
                                         ref).float().chunk(2)
    return e_null - eta * (e_cond - e_null)


def neg_guidance(model, ref, b: Noised, eta: float) -> torch.Tensor:
    return mse(predict(model, b)[0], neg_guidance_target(model, ref, b, eta))


@torch.no_grad()
def reference_prediction(model, ref, b: Noised) -> torch.Tensor:
    return model.predict_noise(b.x_t, b.t, b.cond, ref).float()


def consistency(model, ref, b: Noised) -> torch.Tensor:
    """`‖ε_θ(x_t, t, c_r) − sg ε_0(x_t, t, c_r)‖²`: keep retain predictions where the reference had them."""
    return mse(predict(model, b)[0], reference_prediction(model, ref, b))
