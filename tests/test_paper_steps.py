"""One step of each method against its paper's update, written out here in plain torch.

Every test builds a tiny class-conditional DDPM and one fixed batch, lets the method take one step
with plain SGD (so the parameter update is exactly `−lr ×` the gradient the method formed), and
recomputes the loss and the update from the paper's formula on a copy of the same network, calling
the UNet directly: none of the method's helpers (`erase.methods.losses`) is used for the expected
values. A change to any method's update makes its test fail.

Notation as in docs/methods.md: `ε_θ(x_t, t, c)` is the trained UNet, `ε_0` the frozen original,
`x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε`. Where a method keeps a frozen copy, the live weights are
nudged after `setup()`, so that the test tells "the frozen original" from "the current model".
The batch a step receives is the loop's draw, which `test_the_loops_batch_is_the_papers_draw`
recomputes from its seed. The closed-form edits (`uce`, `speed`) are checked the same way on a
tiny Stable Diffusion: the paper's solution, written out with `torch.linalg` on rows taken from the
pipeline's own tokenizer and text encoder, against the weights the edit writes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from erase.backbones import ClassConditionalDDPM, load_backbone
from erase.backbones.base import Condition
from erase.edits import EDITS, UCE, apply_edit
from erase.edits.speed import Speed, SpeedConfig
from erase.edits.uce import UCEConfig
from erase.methods import METHODS
from erase.methods.base import Batch, StepContext
from erase.noising import Noised
from erase.unlearn_data import UnlearnData
from erase.unlearning.data import draw_shards
from erase.utils import step_generator

from conftest import DIGIT_NAMES

LR = 0.05  # plain SGD: the update is −LR × the method's gradient
FORGET, ANCHOR, RETAIN = 3, 4, (0, 1, 5, 7)

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures in conftest.py


class OneProcess:
    """The accelerator's part a method step uses, for one process without mixed precision."""

    num_processes = 1

    @staticmethod
    def backward(loss):
        loss.backward()


def tiny_ddpm() -> ClassConditionalDDPM:
    torch.manual_seed(0)
    return ClassConditionalDDPM.create(DIGIT_NAMES, image_size=8, channels=1, block_out_channels=(8, 16),
                                       attention_levels=(False, True), norm_num_groups=4)


def labels(*classes) -> torch.Tensor:
    return torch.tensor(classes, dtype=torch.long)


def noise_batch(model, x0, classes, t, noise, anchor=None) -> Noised:
    """x_t by the formula (not the scheduler), as the method receives it."""
    abar = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    return Noised(x0, Condition(class_labels=classes), noise, t, x_t, noise,
                  None if anchor is None else Condition(class_labels=anchor))


def fixed_batch(model) -> Batch:
    g = torch.Generator().manual_seed(1)
    x_f, x_r = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    n_f, n_r = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    forget = noise_batch(model, x_f, labels(*[FORGET] * 4), torch.tensor([10, 300, 600, 900]), n_f,
                         anchor=labels(*[ANCHOR] * 4))
    retain = noise_batch(model, x_r, labels(*RETAIN), torch.tensor([50, 250, 700, 980]), n_r)
    return Batch(forget, retain, step=0)


def tiny_data(model) -> UnlearnData:
    g = torch.Generator().manual_seed(2)
    return UnlearnData(torch.randn(6, 1, 8, 8, generator=g), Condition(class_labels=labels(*[FORGET] * 6)),
                       Condition(class_labels=labels(*[ANCHOR] * 6)), torch.randn(18, 1, 8, 8, generator=g),
                       Condition(class_labels=labels(*RETAIN * 5)[:18]))


def test_the_loops_batch_is_the_papers_draw():
    """The loop's batch of step k (`draw_shards`) is, from the generator of (seed, k): sample indices
    with replacement, t ~ U{0..T−1} in antithetic pairs (t, T−1−t, as SA and SalUn draw them),
    ε ~ N(0, I), x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε and target ε; forget first, then retain."""
    model = tiny_ddpm()
    data = tiny_data(model)
    forget, retain = draw_shards(data, model, 4, 6, seed=7, antithetic=True, step=3, process=0, shards=1)
    g, T = step_generator(7, 3, 0), model.scheduler.config.num_train_timesteps
    abar = model.scheduler.alphas_cumprod
    for got, x0_all, classes in ((forget, data.forget_x0, FORGET), (retain, data.retain_x0, None)):
        n = len(got.x0)
        i = torch.randint(len(x0_all), (n,), generator=g)
        half = torch.randint(T, ((n + 1) // 2,), generator=g)
        t = torch.cat([half, T - 1 - half])[:n]
        noise = torch.randn((n, 1, 8, 8), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(got.x0, x0_all[i], rtol=0, atol=0)
        assert torch.equal(got.t, t)
        torch.testing.assert_close(got.noise, noise, rtol=0, atol=0)
        torch.testing.assert_close(got.x_t, a.sqrt() * x0_all[i] + (1 - a).sqrt() * noise, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.target, noise, rtol=0, atol=0)
        if classes is not None:
            assert (cond(got) == classes).all() and (anchor(got) == ANCHOR).all()


def make(name, model=None, nudge=True, **options):
    """The method on a tiny model after `setup()`, with `θ` (the weights the step starts from) and
    `θ_0` (the original, which its frozen copy holds)."""
    model = model or tiny_ddpm()
    params = dict(model.unet.named_parameters())
    config = METHODS[name].Config(**{"grad_clip": 0.0, **options})
    method = METHODS[name](model, config, tiny_data(model), params)
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    method.setup()
    if nudge:  # θ ≠ θ_0 from here on
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in params.values():
                p.add_(1e-2 * torch.randn(p.shape, generator=g))
    theta = {n: p.detach().clone() for n, p in params.items()}
    return method, model, theta0, theta


def take_step(method, batch):
    params = list(method.params.values())
    ctx = StepContext(OneProcess(), torch.optim.SGD(params, lr=LR), params, grad_clip=0.0)
    logs = method.step(batch, ctx)
    return logs, {n: p.detach().clone() for n, p in method.params.items()}


def eps(unet, weights, x_t, t, classes):
    """The UNet's noise prediction with `weights` (plain torch: functional_call of the module)."""
    return functional_call(unet, weights, (x_t, t), {"class_labels": classes}).sample


def mse(a, b):
    return ((a - b) ** 2).mean()


def grad_of(loss_fn, theta):
    """(loss, ∇loss) at `theta` (a dict of tensors) by autograd."""
    leaves = {n: v.clone().requires_grad_(True) for n, v in theta.items()}
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), {n: torch.zeros_like(v) if g is None else g for (n, v), g in zip(leaves.items(), grads)}


def assert_update(after, theta, grads, scale=LR, mask=None):
    moved = False
    for n in theta:
        expected = theta[n] - scale * grads[n] * (1 if mask is None else mask[n])
        torch.testing.assert_close(after[n], expected, rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")
        moved = moved or not torch.equal(after[n], theta[n])
    assert moved, "the step moved no weight"


def cond(b: Noised) -> torch.Tensor:
    return b.cond.tensors["class_labels"]


def anchor(b: Noised) -> torch.Tensor:
    return b.anchor.tensors["class_labels"]


def null(model, n) -> torch.Tensor:
    return torch.full((n,), model.null_class, dtype=torch.long)


# -- baselines -------------------------------------------------------------------------------------


def test_finetune_descends_on_the_retain_denoising_loss():
    """FT, SalUn's baseline: one descent step on L_simple = ‖ε − ε_θ(x_t, t, c_r)‖² over the retain batch."""
    method, model, _, theta = make("finetune", nudge=False)
    batch = fixed_batch(model)
    r = batch.retain
    loss, grads = grad_of(lambda w: mse(r.noise, eps(model.unet, w, r.x_t, r.t, cond(r))), theta)
    logs, after = take_step(method, batch)
    assert logs["retain"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert_update(after, theta, grads)


def test_ga_ascends_on_forget_and_descends_on_retain():
    """GA, SalUn's baseline: −L_simple(forget) + α L_simple(retain). SalUn's script sums both terms over
    pixels; with both terms means instead the ratio, and so α, is unchanged."""
    method, model, _, theta = make("ga", nudge=False, alpha=0.7)
    batch = fixed_batch(model)
    f, r = batch.forget, batch.retain

    def loss(w):  # −‖ε − ε_θ(x_f, c_f)‖² + α‖ε − ε_θ(x_r, c_r)‖²
        return (-mse(f.noise, eps(model.unet, w, f.x_t, f.t, cond(f)))
                + 0.7 * mse(r.noise, eps(model.unet, w, r.x_t, r.t, cond(r))))

    value, grads = grad_of(loss, theta)
    logs, after = take_step(method, batch)
    assert (-logs["forget"] + 0.7 * logs["retain"]).item() == pytest.approx(value.item(), rel=1e-5)
    assert_update(after, theta, grads)


def rl_loss(model, theta, batch, alpha):
    """SalUn's RL: ‖ε_θ(x_f, c_f) − sg ε_θ(x_f, c_a)‖² + α‖ε − ε_θ(x_r, c_r)‖², the target the current
    model's prediction for the anchor class c_a (SalUn's DDPM script: the fixed label (c_f + 1) mod 10).
    Declared adaptation: α weighs the mean retain loss (SalUn's 1e-3 on the pixel-summed one)."""
    f, r = batch.forget, batch.retain
    with torch.no_grad():
        target = eps(model.unet, theta, f.x_t, f.t, anchor(f))
    return lambda w: (mse(eps(model.unet, w, f.x_t, f.t, cond(f)), target)
                      + alpha * mse(r.noise, eps(model.unet, w, r.x_t, r.t, cond(r))))


def test_rl_remaps_to_the_current_models_anchor_prediction():
    method, model, _, theta = make("rl", alpha=2.0)
    batch = fixed_batch(model)
    value, grads = grad_of(rl_loss(model, theta, batch, 2.0), theta)
    logs, after = take_step(method, batch)
    assert (logs["remap"] + 2.0 * logs["retain"]).item() == pytest.approx(value.item(), rel=1e-5)
    assert_update(after, theta, grads)


# -- SalUn: the masked step (its saliency masks: tests/test_paper_steps_faithful.py) ------------------


def test_salun_step_is_rl_restricted_to_the_mask():
    method, model, _, theta = make("salun", alpha=2.0, mask_ratio=0.4)
    batch = fixed_batch(model)
    value, grads = grad_of(rl_loss(model, theta, batch, 2.0), theta)
    logs, after = take_step(method, batch)
    assert (logs["remap"] + 2.0 * logs["retain"]).item() == pytest.approx(value.item(), rel=1e-5)
    assert_update(after, theta, grads, mask=method.mask)
    assert not any(((after[n] != theta[n]) & (method.mask[n] == 0)).any() for n in theta)  # none outside moved
    assert 0 < sum(m.sum().item() for m in method.mask.values()) < sum(m.numel() for m in method.mask.values())


# -- ESD ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_esd_learns_the_originals_negatively_guided_noise(eta):
    method, model, theta0, theta = make("esd", eta=eta)
    batch = fixed_batch(model)
    f = batch.forget
    with torch.no_grad():  # ESD: ε_0(∅) − η(ε_0(c_f) − ε_0(∅)), from the frozen original
        e_u = eps(model.unet, theta0, f.x_t, f.t, null(model, 4))
        e_c = eps(model.unet, theta0, f.x_t, f.t, cond(f))
        target = e_u - eta * (e_c - e_u)
        # The authors' current script writes ε_0(c) − η'(ε_0(c) − ε_0(∅)): the same target at η' = η + 1.
        torch.testing.assert_close(e_c - (eta + 1) * (e_c - e_u), target)
    value, grads = grad_of(lambda w: mse(eps(model.unet, w, f.x_t, f.t, cond(f)), target), theta)
    batch = Batch(f, None, 0)
    logs, after = take_step(method, batch)
    assert logs["esd"].item() == pytest.approx(value.item(), rel=1e-5)
    assert_update(after, theta, grads)


# -- surgery -----------------------------------------------------------------------------------------


def surgery_parts(model, target_weights, theta, batch):
    """g_f = ∇‖ε_θ(c_f) − sg ε_target(c_a)‖², g_r = ∇‖ε − ε_θ(c_r)‖², and ⟨g_r, g_f⟩, ‖g_r‖²."""
    f, r = batch.forget, batch.retain
    with torch.no_grad():
        target = eps(model.unet, target_weights, f.x_t, f.t, anchor(f))
    lf, g_f = grad_of(lambda w: mse(eps(model.unet, w, f.x_t, f.t, cond(f)), target), theta)
    lr_, g_r = grad_of(lambda w: mse(r.noise, eps(model.unet, w, r.x_t, r.t, cond(r))), theta)
    dot = sum((g_r[n] * g_f[n]).sum() for n in theta).item()
    norm2 = sum((g_r[n] ** 2).sum() for n in theta).item()
    return lf, lr_, g_f, g_r, dot, norm2


@pytest.mark.parametrize("slack,target", [("none", "reference"), ("binding", "reference"), ("binding", "current")])
def test_surgery_projects_the_forget_gradient(slack, target):
    """Step along g_f + λ* g_r, λ* = max(0, (−⟨g_r, g_f⟩ − ε)/‖g_r‖²); the remap target is the frozen
    original's anchor prediction (reference, as eupmu) or the current model's (`target=current`)."""
    method, model, theta0, theta = make("surgery", target=target)
    batch = fixed_batch(model)
    lf, lr_, g_f, g_r, dot, norm2 = surgery_parts(model, theta0 if target == "reference" else theta, theta, batch)
    # ε above −⟨g_r, g_f⟩ leaves λ* = 0; below it the constraint binds (λ* > 0).
    e = -dot + abs(dot) + 1e-3 * norm2 if slack == "none" else -dot - abs(dot) - 1e-3 * norm2
    method.config.eps = e
    lam = max(0.0, (-dot - e) / norm2)
    assert (lam == 0) == (slack == "none")
    logs, after = take_step(method, batch)
    assert logs["remap"].item() == pytest.approx(lf.item(), rel=1e-5)
    assert logs["retain"].item() == pytest.approx(lr_.item(), rel=1e-5)
    assert logs["lambda"].item() == pytest.approx(lam, rel=1e-4, abs=1e-8)
    assert_update(after, theta, {n: g_f[n] + lam * g_r[n] for n in theta})


# -- MOX -----------------------------------------------------------------------------------------------


def test_mox_memorizes_then_extrapolates_from_the_original():
    """θ_m ← θ − lr∇[‖ε − ε_θ(c_f)‖² + γ‖ε_θ(c_r) − ε_0(c_r)‖²]; θ_u = θ_0 + α(θ_0 − θ_m) = (1 + α)θ_0 − αθ_m.
    Declared adaptation: the paper's KL to the reference on retain data is, for a denoiser, the
    squared distance of the noise predictions (the γ term)."""
    method, model, theta0, theta = make("mox", alpha=2.5, gamma=4.0, weight_decay=0.0)
    batch = fixed_batch(model)
    f, r = batch.forget, batch.retain
    with torch.no_grad():
        keep = eps(model.unet, theta0, r.x_t, r.t, cond(r))
    value, grads = grad_of(lambda w: mse(f.noise, eps(model.unet, w, f.x_t, f.t, cond(f)))
                           + 4.0 * mse(eps(model.unet, w, r.x_t, r.t, cond(r)), keep), theta)
    logs, after = take_step(method, batch)
    assert (logs["memorize"] + 4.0 * logs["consistency"]).item() == pytest.approx(value.item(), rel=1e-5)
    assert_update(after, theta, grads)
    method.finish()
    for n, p in method.params.items():
        torch.testing.assert_close(p.detach(), theta0[n] + 2.5 * (theta0[n] - after[n]), rtol=1e-4, atol=1e-6)


def test_mox_momentum_averages_the_extrapolations():
    """The momentum variant: θ_u ← η(θ_0 + α(θ_0 − θ_m)) + (1 − η)θ_u after every step, θ_u at the end."""
    method, model, theta0, _ = make("mox", alpha=2.5, gamma=4.0, weight_decay=0.0, momentum=0.675)
    batch = fixed_batch(model)
    _, theta1 = take_step(method, batch)
    _, theta2 = take_step(method, batch)
    method.finish()
    for n, p in method.params.items():
        u1 = theta0[n] + 2.5 * (theta0[n] - theta1[n])
        u2 = theta0[n] + 2.5 * (theta0[n] - theta2[n])
        torch.testing.assert_close(p.detach(), 0.675 * u2 + 0.325 * u1, rtol=1e-4, atol=1e-6)


# -- ∇τ ----------------------------------------------------------------------------------------------------


def test_gradtau_squared_hinge_with_decaying_alpha():
    """α_k ReLU(L_ref − L_f)² + (1 − α_k) L_r, α_k = α_0(1 − k/K), lr × (1 − 0.9 k/K)."""
    method, model, _, theta = make("gradtau", alpha0=0.6, steps=4, ref_every=100)
    batch = fixed_batch(model)
    batch.step = 1  # not a re-estimation step: L_ref is the one set here
    f, r = batch.forget, batch.retain
    with torch.no_grad():
        l_f = mse(f.noise, eps(model.unet, theta, f.x_t, f.t, cond(f))).item()
    method.l_ref = l_ref = 1.5 * l_f  # above L_f: the hinge is active
    a = 0.6 * (1 - 1 / 4)

    def loss(w):
        forget = mse(f.noise, eps(model.unet, w, f.x_t, f.t, cond(f)))
        return a * torch.relu(l_ref - forget) ** 2 + (1 - a) * mse(r.noise, eps(model.unet, w, r.x_t, r.t, cond(r)))

    value, grads = grad_of(loss, theta)
    logs, after = take_step(method, batch)
    got = a * max(0.0, l_ref - logs["forget"].item()) ** 2 + (1 - a) * logs["retain"].item()
    assert got == pytest.approx(value.item(), rel=1e-5)
    assert_update(after, theta, grads)
    assert method.lr_scale(1) == pytest.approx(1 - 0.9 / 4)
    method.l_ref = 0.5 * l_f  # below L_f: the ascent term stops by itself, only the retain term is left
    with torch.no_grad():
        retain_after = mse(r.noise, eps(model.unet, after, r.x_t, r.t, cond(r))).item()
    assert method.loss(batch)[0].item() == pytest.approx((1 - a) * retain_after, rel=1e-4)


def test_gradtau_reference_level_is_the_originals_null_condition_loss():
    """L_ref = ref_scale × ‖ε − ε_0(x_t, t, ∅)‖² on forget images (the draws are the method's stream)."""
    method, model, theta0, _ = make("gradtau", ref_scale=3.0, ref_batches=1, batch_size=8)
    g = step_generator(method.config.seed, 1 << 41, 0)
    data = method.data
    idx = torch.randint(len(data.forget_x0), (4,), generator=g)
    t = model.draw_timesteps(4, g, False)
    noise = torch.randn((4, 1, 8, 8), generator=g)
    b = noise_batch(model, data.forget_x0[idx], null(model, 4), t, noise)
    with torch.no_grad():
        expected = 3.0 * mse(noise, eps(model.unet, theta0, b.x_t, t, null(model, 4))).item()
    assert method.estimate_reference(0) == pytest.approx(expected, rel=1e-5)


# -- LUR -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order,second_order", [("forget-first", True), ("retain-first", True),
                                                ("forget-first", False)])
def test_lur_look_ahead_objective(order, second_order):
    """forget-first: θ' = θ − a∇L_f(θ), objective L_f(θ) + β L_r(θ'); retain-first swaps the roles.
    First order (for SD): the inner gradient is a constant, θ' = θ − a sg(∇L_f(θ)). Declared
    adaptations: L_f is the remap to the current model's anchor prediction, L_r the retain L_simple,
    and the inner/outer order is the module's reading of the paper."""
    method, model, _, theta = make("lur", inner_lr=0.3, beta=0.8, order=order, second_order=second_order)
    batch = fixed_batch(model)
    f, r = batch.forget, batch.retain
    with torch.no_grad():
        target = eps(model.unet, theta, f.x_t, f.t, anchor(f))

    def l_f(w):
        return mse(eps(model.unet, w, f.x_t, f.t, cond(f)), target)

    def l_r(w):
        return mse(r.noise, eps(model.unet, w, r.x_t, r.t, cond(r)))

    inner, outer = (l_f, l_r) if order == "forget-first" else (l_r, l_f)

    def objective(w):
        first = inner(w)
        g = torch.autograd.grad(first, list(w.values()), create_graph=second_order, retain_graph=True,
                                allow_unused=True)
        ahead = {n: v if gi is None else v - 0.3 * gi for (n, v), gi in zip(w.items(), g)}
        return (first + 0.8 * outer(ahead)) if order == "forget-first" else (0.8 * first + outer(ahead))

    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        value, grads = grad_of(objective, theta)
    logs, after = take_step(method, batch)
    if order == "forget-first":
        got = logs["remap"] + 0.8 * logs["retain"]
    else:
        got = 0.8 * logs["retain"] + logs["remap"]
    assert got.item() == pytest.approx(value.item(), rel=1e-5)
    assert_update(after, theta, grads)


# -- EUPMU ------------------------------------------------------------------------------------------------


def adam_first_step(w, grad, lr, weight_decay):
    """torch.optim.Adam's first step (weight decay added to the gradient, bias-corrected moments)."""
    g = grad + weight_decay * w
    return w - lr * g / (math.sqrt(g * g) + 1e-8)


@pytest.mark.parametrize("variant", ["ours", "authors"])
def test_eupmu_log_objective_and_dual_step(variant):
    """w log L_r + log L_f (authors: divided by 1 + w, remap to the current model's anchor, w unclamped),
    then δ = log L_r(before) − log L_r(after) − ε and one Adam step on w with gradient δ."""
    authors = variant == "authors"
    options = dict(target="current", normalize=True, w_nonnegative=False) if authors else {}
    method, model, theta0, theta = make("eupmu", eps=-5.0, w_lr=0.9, **options)
    w0 = 0.4
    with torch.no_grad():
        method.w.fill_(w0)
    batch = fixed_batch(model)
    f, r = batch.forget, batch.retain
    with torch.no_grad():
        target = eps(model.unet, theta if authors else theta0, f.x_t, f.t, anchor(f))

    def objective(w):
        l_f = mse(eps(model.unet, w, f.x_t, f.t, cond(f)), target)
        l_r = mse(r.noise, eps(model.unet, w, r.x_t, r.t, cond(r)))
        total = w0 * torch.log(l_r) + torch.log(l_f)
        return total / (1 + w0) if authors else total

    _, grads = grad_of(objective, theta)
    with torch.no_grad():
        l_f = mse(eps(model.unet, theta, f.x_t, f.t, cond(f)), target).item()
        before = mse(r.noise, eps(model.unet, theta, r.x_t, r.t, cond(r))).item()
    logs, after = take_step(method, batch)
    assert logs["remap"].item() == pytest.approx(l_f, rel=1e-5)
    assert logs["retain"].item() == pytest.approx(before, rel=1e-5)
    assert_update(after, theta, grads)
    with torch.no_grad():
        later = mse(r.noise, eps(model.unet, after, r.x_t, r.t, cond(r))).item()
    delta = math.log(before) - math.log(later) + 5.0
    w1 = adam_first_step(w0, delta, 0.9, 0.01)
    assert w1 < 0  # ε < 0 drives w below zero here: the projection matters
    assert logs["w"].item() == pytest.approx(w1 if authors else max(0.0, w1), rel=1e-5, abs=1e-7)


# -- closed-form edits (uce, speed) on a tiny Stable Diffusion ------------------------------------------------

PAIRS = [("a photo of the number 3", "a photo of the number 5"), ("three", "a digit")]
KEEP = ["the number 7", "a photo of a cat"]


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_dir):
    return load_backbone(tiny_sd_dir)


def clip_embeddings(model, prompts):
    """Every row of the prompts' text embeddings (77 per prompt) and each prompt's last-word index,
    straight from the pipeline's tokenizer and text encoder, as UCE's script takes them."""
    tokens = model.tokenizer(prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = model.text_encoder(tokens.input_ids)[0].double()
    return emb, tokens.attention_mask.sum(1) - 2


def uce_rows(model, pairs, keep):
    """UCE's rows: an erased prompt's rows from its last word to the end, aligned at the last word with
    its guide prompt's (`old_emb[i:L − max(0, far − i)]`); a preserved prompt's every row."""
    erase, guide = [], []
    for forget, anchor_prompt in pairs:
        emb, last = clip_embeddings(model, [forget, anchor_prompt])
        i, j = int(last[0]), int(last[1])
        far, length = max(i, j), emb.shape[1]
        erase.append(emb[0, i:length - max(0, far - i)])
        guide.append(emb[1, j:length - max(0, far - j)])
    keep_rows = clip_embeddings(model, keep)[0].reshape(-1, emb.shape[-1])
    return torch.cat(erase), torch.cat(guide), keep_rows


def kv_weights(model):
    """UCE's layers: every cross-attention key and value projection (`attn2.to_k`, `attn2.to_v`)."""
    return {f"{name}.weight": m.weight.detach().double().clone() for name, m in model.unet.named_modules()
            if "attn2" in name and name.endswith(("to_k", "to_v"))}


def uce_solution(w, c_e, c_a, c_p, lamb, s_e, s_p):
    """UCE eq. 7: W' = (λW + s_e Σ v*_i c_iᵀ + s_p Σ W c_j c_jᵀ)(λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ)⁻¹,
    v*_i = W c_a,i (the guide concept's original output); rows of C are the c's."""
    eye = torch.eye(w.shape[1], dtype=w.dtype)
    mat1 = lamb * w + s_e * (c_a @ w.T).T @ c_e + s_p * (c_p @ w.T).T @ c_p
    mat2 = lamb * eye + s_e * c_e.T @ c_e + s_p * c_p.T @ c_p
    return mat1 @ torch.linalg.inv(mat2)


def null_space(c_p, threshold):
    """SPEED's projector P = Û Ûᵀ, Û the eigenvectors of K_p K_pᵀ (K_p = C_pᵀ) whose eigenvalues are at most
    `threshold` × the largest (here from the SVD of K_p: eigenvalues σ², zero past its rank)."""
    u, s, _ = torch.linalg.svd(c_p.T, full_matrices=True)
    eig = torch.zeros(u.shape[0], dtype=s.dtype)
    eig[:len(s)] = s ** 2
    u_hat = u[:, eig <= threshold * eig.max()]
    return u_hat @ u_hat.T


def speed_solution(w, c_e, c_a, projector, lamb):
    """SPEED's closed form: W' = W + Δ, Δ = R K_eᵀ P (K_e K_eᵀ P + λI)⁻¹, R = W K_a − W K_e (K = Cᵀ)."""
    k_e, k_a = c_e.T, c_a.T
    r = w @ k_a - w @ k_e
    return w + r @ k_e.T @ projector @ torch.linalg.inv(k_e @ k_e.T @ projector + lamb * torch.eye(w.shape[1],
                                                                                                 dtype=w.dtype))


def assert_edited(changed, expected):
    assert set(changed) == set(expected)
    for name, w in expected.items():
        torch.testing.assert_close(changed[name].double(), w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_uce_writes_the_papers_closed_form(tiny_sd):
    """UCE (Gandikota et al., eq. 7) per layer, with λ, the erase and preserve scales all away from 1."""
    model = copy.deepcopy(tiny_sd)
    c_e, c_a, c_p = uce_rows(model, PAIRS, KEEP)
    expected = {n: uce_solution(w, c_e, c_a, c_p, 0.2, 1.5, 0.3) for n, w in kv_weights(model).items()}
    changed, _ = apply_edit(model, UCE(UCEConfig(lamb=0.2, erase_scale=1.5, preserve_scale=0.3)), PAIRS, KEEP)
    assert_edited(changed, expected)
    # What eq. 7 is for: the erased rows' outputs move towards the guide's original outputs.
    w, w_new = kv_weights(tiny_sd)[next(iter(expected))], expected[next(iter(expected))]
    assert (c_e @ w_new.T - c_a @ w.T).norm() < 0.75 * (c_e @ w.T - c_a @ w.T).norm()


def test_speed_writes_the_null_space_closed_form(tiny_sd):
    """SPEED's null-space edit per layer, the preserved rows being the retain prompts' and, always, the
    empty prompt's (SPEED's invariant constraint: unconditional predictions stay). Declared
    adaptation: the null space is cut at a threshold relative to the largest eigenvalue; here the
    threshold is set between two eigenvalues, so that the null space is half of the 16 directions."""
    model = copy.deepcopy(tiny_sd)
    c_e, c_a, c_p = uce_rows(model, PAIRS, KEEP + [""])
    eig = torch.linalg.eigvalsh(c_p.T @ c_p)  # ascending
    half = len(eig) // 2
    threshold = float((eig[half - 1] * eig[half]).sqrt() / eig[-1])
    projector = null_space(c_p, threshold)
    assert round(float(torch.trace(projector))) == half
    expected = {n: speed_solution(w, c_e, c_a, projector, 0.7) for n, w in kv_weights(model).items()}
    changed, _ = apply_edit(model, Speed(SpeedConfig(lamb=0.7, null_threshold=threshold)), PAIRS, KEEP)
    assert_edited(changed, expected)
    # What the constraint is for: rows in the preserved span (P c = 0) give the same outputs as before.
    w, w_new = kv_weights(tiny_sd)[next(iter(expected))], expected[next(iter(expected))]
    kept = c_p - c_p @ projector
    torch.testing.assert_close(kept @ w_new.T, kept @ w.T, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(c_e @ w_new.T, c_e @ w.T)


def test_every_registered_method_and_edit_has_its_paper_step_here():
    """A method or edit added to the registries needs its own one-step test in this file."""
    tests = [name for name in globals() if name.startswith("test_")]
    missing = [m for m in (*METHODS, *EDITS) if not any(t.startswith(f"test_{m}_") for t in tests)]
    assert not missing, f"no paper-step test for {missing}"
