"""One step of `esd`, `eupmu`, `salun` and `gradtau` against their papers' updates, written out here.

Each test builds a tiny model (the class-conditional DDPM, and for the Stable Diffusion settings
of the papers a tiny SD 1.x pipeline) and a fixed batch: clean samples, noise and timesteps drawn
here, `x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε` from the scheduler's table. The expected loss and
update are computed from the paper's formula in plain torch: the network is called directly
(`functional_call` of the UNet), and nothing of `erase.methods.losses` is used. The method then
takes its own step with plain SGD and the gradient clip of the loop (`clip_grad_norm_`), so the
parameter update is `−lr × clip(∇)` of what the method formed, and the test compares loss and
update at a tight tolerance. Where a method draws its own samples (SalUn's mask pass, ∇τ's
reference level), the draws are recorded as they are made and the formula is applied to them.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from erase.backbones import ClassConditionalDDPM, Condition, StableDiffusionBackbone
from erase.methods import METHODS
from erase.methods import gradtau as gradtau_module
from erase.methods import salun as salun_module
from erase.methods.base import Batch, StepContext
from erase.noising import Noised
from erase.unlearn_data import UnlearnData

from conftest import DIGIT_NAMES
from test_paper_steps import grad_of, mse
from test_sd_backbone import tiny_pipeline

LR = 0.05  # plain SGD: the update is −LR × the clipped gradient
FORGET, ANCHOR, RETAIN = 3, 4, (0, 1, 5, 7)

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures in conftest.py


# -- the two tiny models, their data and one fixed batch --------------------------------------------


def tiny_ddpm() -> ClassConditionalDDPM:
    torch.manual_seed(0)
    return ClassConditionalDDPM.create(DIGIT_NAMES, image_size=8, channels=1, block_out_channels=(8, 16),
                                       attention_levels=(False, True), norm_num_groups=4)


def tiny_sd() -> StableDiffusionBackbone:
    return StableDiffusionBackbone(tiny_pipeline())


def classes(*labels) -> Condition:
    return Condition(class_labels=torch.tensor(labels, dtype=torch.long))


def conditions(model, kind: str, n: int) -> Condition:
    """n rows of the forget, anchor or retain condition: digit labels, or prompts on SD."""
    if isinstance(model, ClassConditionalDDPM):
        labels = {"forget": [FORGET] * n, "anchor": [ANCHOR] * n, "retain": [RETAIN[i % 4] for i in range(n)]}[kind]
        return classes(*labels)
    prompts = {"forget": ["the number 3"] * n, "anchor": ["the number 4"] * n,
               "retain": [["the number 5", "the digit 7"][i % 2] for i in range(n)]}[kind]
    with torch.no_grad():
        return model.encode_conditions(prompts).to("cpu")


def shape(model) -> tuple[int, ...]:
    return (1, 8, 8) if isinstance(model, ClassConditionalDDPM) else tuple(model.latent_shape)


def alphas_bar(model, t):
    return model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)


def fixed_batch(model) -> Batch:
    """Four forget and four retain samples with their noise and timesteps, noised by the formula."""
    g = torch.Generator().manual_seed(1)
    x_f, x_r = torch.randn(4, *shape(model), generator=g), torch.randn(4, *shape(model), generator=g)
    n_f, n_r = torch.randn(4, *shape(model), generator=g), torch.randn(4, *shape(model), generator=g)

    def batch(x0, noise, t, kind, anchor=None):
        a = alphas_bar(model, t)
        return Noised(x0, conditions(model, kind, 4), noise, t, a.sqrt() * x0 + (1 - a).sqrt() * noise, noise, anchor)

    forget = batch(x_f, n_f, torch.tensor([10, 300, 600, 900]), "forget", conditions(model, "anchor", 4))
    retain = batch(x_r, n_r, torch.tensor([50, 250, 700, 980]), "retain")
    return Batch(forget, retain, step=0)


def tiny_data(model) -> UnlearnData:
    g = torch.Generator().manual_seed(2)
    return UnlearnData(torch.randn(6, *shape(model), generator=g), conditions(model, "forget", 6),
                       conditions(model, "anchor", 6), torch.randn(12, *shape(model), generator=g),
                       conditions(model, "retain", 12))


def make(name, model, params="all", **options):
    """The method after `setup()`, with `θ_0` (the original, which a frozen copy holds) and `θ` (the
    weights the step starts from: nudged away from `θ_0`, so that "frozen original" and "current
    model" give different numbers)."""
    trainable = model.trainable_parameters(params)
    config = METHODS[name].Config(**{"grad_clip": 0.0, **options})
    method = METHODS[name](model, config, tiny_data(model), trainable)
    theta0 = {n: p.detach().clone() for n, p in trainable.items()}
    method.setup()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(1e-2 * torch.randn(p.shape, generator=g))
    theta = {n: p.detach().clone() for n, p in trainable.items()}
    return method, theta0, theta


class OneProcess:
    """The accelerator's part a method step uses, for one process without mixed precision."""

    num_processes = 1

    @staticmethod
    def backward(loss):
        loss.backward()


def take_step(method, batch, clip=0.0):
    params = list(method.params.values())
    ctx = StepContext(OneProcess(), torch.optim.SGD(params, lr=LR), params, grad_clip=clip)
    logs = method.step(batch, ctx)
    return logs, {n: p.detach().clone() for n, p in method.params.items()}


# -- the paper's side: plain torch ---------------------------------------------------------------------


def eps(model, weights, x_t, t, cond: Condition):
    """ε_θ(x_t, t, c): the UNet called with `weights` in place of its trainable parameters."""
    return functional_call(model.denoiser, weights, (x_t, t), dict(cond.tensors)).sample


def null(model, n) -> Condition:
    return model.null_condition(n)


def clip(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (‖g‖ + 1e-6) when that is below 1."""
    if max_norm <= 0:
        return grads
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
    return {n: g * min(1.0, max_norm / (norm.item() + 1e-6)) for n, g in grads.items()}


def assert_update(after, theta, grads, mask=None):
    for n in theta:
        expected = theta[n] - LR * grads[n] * (1 if mask is None else mask[n])
        torch.testing.assert_close(after[n], expected, rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")
    assert any(not torch.equal(after[n], theta[n]) for n in theta), "the step moved no weight"


# -- ESD ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone, group", [("ddpm", "condition"), ("sd", "nocondition")])
def test_esd_step_is_the_papers_negative_guidance(backbone, group):
    """ESD (Gandikota et al., eq. 2): ‖ε_θ(x_t, c) − [ε_0(x_t) − η(ε_0(x_t, c) − ε_0(x_t))]‖², with the
    frozen original ε_0 and η = 1; on the DDPM the class embedding trains (ESD-x's counterpart), on
    SD everything but cross-attention (ESD-u). The authors' current script's target,
    ε_0(c) − η'(ε_0(c) − ε_0(∅)) with its default η' = 2, is the same target."""
    model = tiny_ddpm() if backbone == "ddpm" else tiny_sd()
    method, theta0, theta = make("esd", model, params=group, lr=LR)
    f = fixed_batch(model).forget
    with torch.no_grad():
        e_u = eps(model, theta0, f.x_t, f.t, null(model, 4))
        e_c = eps(model, theta0, f.x_t, f.t, f.cond)
        target = e_u - 1.0 * (e_c - e_u)
        torch.testing.assert_close(e_c - 2.0 * (e_c - e_u), target)  # the script's η' = 2
    value, grads = grad_of(lambda w: mse(eps(model, w, f.x_t, f.t, f.cond), target), theta)
    logs, after = take_step(method, Batch(f, None, 0), clip=1e-3)  # a clip that binds
    assert logs["esd"].item() == pytest.approx(value.item(), rel=1e-5)
    assert_update(after, theta, clip(grads, 1e-3))


# -- EUPMU ----------------------------------------------------------------------------------------------


def dual_weight(w0, deltas, project, lr=0.9, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8):
    """w after one torch.optim.Adam step per δ (weight decay added to the gradient, bias-corrected
    moments), projected onto w ≥ 0 after each step when `project`."""
    m = v = 0.0
    w = w0
    for k, delta in enumerate(deltas, start=1):
        g = delta + weight_decay * w
        m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        w = w - lr * (m / (1 - betas[0] ** k)) / (math.sqrt(v / (1 - betas[1] ** k)) + eps)
        w = max(0.0, w) if project else w
    return w


@pytest.mark.parametrize("backbone, variant", [("ddpm", "ours"), ("ddpm", "authors"), ("sd", "authors")])
def test_eupmu_steps_are_the_papers_dual_update(backbone, variant):
    """EUPMU (Zhou et al.): minimise w·log L_r + log L_f (the authors' code: divided by 1 + w, the remap
    target the current model's anchor prediction, detached; ours: the frozen original's), then
    δ = log L_r(before) − log L_r(after) − ε on the same batch and an Adam step on w with gradient δ
    (the authors never clamp w; ours projects it onto w ≥ 0). Two steps, so that Adam's second step
    depends on the size of δ and not only on its sign."""
    authors = variant == "authors"
    model = tiny_ddpm() if backbone == "ddpm" else tiny_sd()
    options = dict(target="current", normalize=True, w_nonnegative=False) if authors else {}
    method, theta0, theta = make("eupmu", model, eps=-1.0, w_lr=0.9, **options)
    w0 = 0.4
    with torch.no_grad():
        method.w.fill_(w0)
    batch = fixed_batch(model)
    f, r = batch.forget, batch.retain

    def l_f(weights, target):
        return mse(eps(model, weights, f.x_t, f.t, f.cond), target)

    def l_r(weights):
        return mse(r.noise, eps(model, weights, r.x_t, r.t, r.cond))

    w, retain_before, retain_after = w0, [], []
    for k in range(2):
        with torch.no_grad():
            target = eps(model, theta if authors else theta0, f.x_t, f.t, f.anchor)

        def objective(weights, w=w, target=target):
            total = w * torch.log(l_r(weights)) + torch.log(l_f(weights, target))
            return total / (1 + w) if authors else total

        _, grads = grad_of(objective, theta)
        with torch.no_grad():
            forget, before = l_f(theta, target).item(), l_r(theta).item()
        logs, after = take_step(method, batch)
        assert logs["remap"].item() == pytest.approx(forget, rel=1e-5)
        assert logs["retain"].item() == pytest.approx(before, rel=1e-5)
        assert_update(after, theta, grads)
        with torch.no_grad():
            retain_before.append(before)
            retain_after.append(l_r(after).item())
        deltas = [math.log(b) - math.log(a) + 1.0 for b, a in zip(retain_before, retain_after)]
        w = dual_weight(w0, deltas, project=not authors)
        assert logs["w"].item() == pytest.approx(w, rel=1e-5, abs=1e-7)
        theta = after
    assert dual_weight(w0, deltas[:1], project=False) < 0  # the first dual step goes below zero: the projection acts


# -- SalUn ----------------------------------------------------------------------------------------------


def recorded_draws(monkeypatch, module):
    """Every batch `module` noises, as it draws it (the draws are data here; the formulas are below)."""
    draws = []
    original = module.noised

    def spy(*args, **kwargs):
        b = original(*args, **kwargs)
        draws.append(b)
        return b

    monkeypatch.setattr(module, "noised", spy)
    return draws


def top_share(saliency, ratio):
    """1 on the entries whose saliency is among the top `ratio` of all (one global threshold), and the
    threshold."""
    flat = torch.cat([s.flatten() for s in saliency.values()])
    k = max(1, round(ratio * flat.numel()))
    threshold = flat.sort(descending=True).values[k - 1]
    return {n: (s >= threshold).float() for n, s in saliency.items()}, threshold


def assert_same_mask(method_mask, saliency, ratio, magnitude=None):
    """The method's mask is the top `ratio` of `saliency`, up to entries within float noise of the
    threshold (relative to `magnitude`, the size of the terms summed into each entry: a sum whose
    terms cancel carries their rounding)."""
    expected, threshold = top_share(saliency, ratio)
    for n, s in saliency.items():
        differ = method_mask[n] != expected[n]
        near = (s - threshold).abs() <= 1e-5 * (threshold if magnitude is None else magnitude[n] + threshold)
        assert not (differ & ~near).any(), f"{n}: {int((differ & ~near).sum())} mask entries differ"


def authors_batch_gradients(model, method, draws, w, theta0):
    """∇ Σ_pixels ‖ε − ε̃_θ‖² averaged over each forget batch the mask pass drew, ε̃ = (1 + w)ε_θ(c_f) − wε_θ(∅)."""
    data, grads, start = method.data, [], 0
    for b in draws:
        x0, t = data.forget_x0[start:start + len(b.x0)], b.t
        half = (len(t) + 1) // 2  # antithetic timesteps, as their DDPM script: the second half is T − 1 − t
        assert torch.equal(t[half:], model.num_train_timesteps - 1 - t[:len(t) - half])
        a = alphas_bar(model, t)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * b.noise
        torch.testing.assert_close(b.x_t, x_t)
        cond = data.forget_cond[start:start + len(x0)]

        def loss(weights, x_t=x_t, t=t, cond=cond, noise=b.noise):
            e_c, e_u = eps(model, weights, x_t, t, cond), eps(model, weights, x_t, t, null(model, len(x_t)))
            guided = (1 + w) * e_c - w * e_u
            return ((noise - guided) ** 2).sum(dim=(1, 2, 3)).mean()

        grads.append(grad_of(loss, theta0)[1])
        start += len(x0)
    return grads


def norm(grads) -> float:
    return torch.sqrt(sum((v ** 2).sum() for v in grads.values())).item()


@pytest.mark.parametrize("backbone", ["ddpm", "sd"])
def test_salun_authors_mask_is_their_saliency(backbone, monkeypatch):
    """SalUn's mask scripts: |Σ_b clip(∇ Σ_pixels ‖ε − ε̃_θ‖²)| over the forget batches b, with
    ε̃ = (1 + w)ε_θ(c_f) − wε_θ(∅), the top half kept. Their DDPM script: w = 2, each batch's gradient
    clipped (here to a norm between the two batches', so that the clip acts on one: the loss's scale
    and the order of clip and sum both matter); their SD script: w = 7.5 and no clip
    (`--saliency-guidance 8.5 --saliency-clip 0`)."""
    w = 2.0 if backbone == "ddpm" else 7.5
    build = tiny_ddpm if backbone == "ddpm" else tiny_sd
    options = dict(saliency="authors", saliency_guidance=1 + w, mask_ratio=0.5, mask_batch_size=5)
    draws = recorded_draws(monkeypatch, salun_module)
    method, theta0, _ = make("salun", build(), saliency_clip=0.0, **options)
    assert [len(b.x0) for b in draws] == [5, 1]
    grads = authors_batch_gradients(method.model, method, draws, w, theta0)
    max_norm = 0.0
    if backbone == "ddpm":
        low, high = sorted(norm(g) for g in grads)
        assert high > 1.2 * low
        max_norm = math.sqrt(low * high)
        method, *_ = make("salun", build(), saliency_clip=max_norm, **options)  # the same draws again
        by_default, *_ = make("salun", build(), grad_clip=max_norm, **options)  # --saliency-clip: --grad-clip
        assert all(torch.equal(by_default.mask[n], method.mask[n]) for n in theta0)
    clipped = [clip(g, max_norm) for g in grads]
    total = {n: sum(g[n] for g in clipped) for n in theta0}
    magnitude = {n: sum(g[n].abs() for g in clipped) for n in theta0}
    assert_same_mask(method.mask, {n: v.abs() for n, v in total.items()}, 0.5, magnitude)


def test_salun_default_mask_is_the_conditional_saliency(monkeypatch):
    """Ours: Σ_b |∇ mean ‖ε − ε_θ(x_t, c_f)‖²| (the conditional prediction, no clip), the top half kept;
    it is not the authors' mask."""
    model = tiny_ddpm()
    draws = recorded_draws(monkeypatch, salun_module)
    method, theta0, _ = make("salun", model, mask_ratio=0.5, mask_batch_size=4)
    total = {n: torch.zeros_like(v) for n, v in theta0.items()}
    for start, b in zip((0, 4), draws):
        cond = method.data.forget_cond[start:start + len(b.x0)]
        _, g = grad_of(lambda weights: mse(b.noise, eps(model, weights, b.x_t, b.t, cond)), theta0)
        for n, v in g.items():
            total[n] += v.abs()
    assert_same_mask(method.mask, total, 0.5)
    theirs, *_ = make("salun", tiny_ddpm(), saliency="authors", mask_ratio=0.5, mask_batch_size=4)
    shared = sum((method.mask[n] * theirs.mask[n]).sum().item() for n in total) / sum(
        m.sum().item() for m in method.mask.values())
    assert 0 < shared < 1


@pytest.mark.parametrize("backbone", ["ddpm", "sd"])
def test_salun_step_is_random_label_within_the_mask(backbone):
    """SalUn's update: ∇[‖ε_θ(x_f, c_f) − sg ε_θ(x_f, c_a)‖² + α‖ε − ε_θ(x_r, c_r)‖²] (the current
    model's anchor prediction, SalUn's RL), zeroed outside the mask."""
    model = tiny_ddpm() if backbone == "ddpm" else tiny_sd()
    method, _, theta = make("salun", model, saliency="authors", alpha=0.1, mask_ratio=0.5, mask_batch_size=4)
    batch = fixed_batch(model)
    f, r = batch.forget, batch.retain
    with torch.no_grad():
        target = eps(model, theta, f.x_t, f.t, f.anchor)
    value, grads = grad_of(lambda w: mse(eps(model, w, f.x_t, f.t, f.cond), target)
                           + 0.1 * mse(r.noise, eps(model, w, r.x_t, r.t, r.cond)), theta)
    logs, after = take_step(method, batch)
    assert (logs["remap"] + 0.1 * logs["retain"]).item() == pytest.approx(value.item(), rel=1e-5)
    assert_update(after, theta, grads, mask=method.mask)
    assert all(torch.equal(after[n][method.mask[n] == 0], theta[n][method.mask[n] == 0]) for n in theta)


# -- ∇τ -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["null", "conditional"])
def test_gradtau_step_is_the_squared_hinge_at_its_level(reference, monkeypatch):
    """∇τ (Trippa et al.): α_k·ReLU(L_ref − L_f)² + (1 − α_k)·L_r, α_k = α_0(1 − k/K), lr × (1 − 0.9k/K).
    L_ref = ref_scale × the frozen original's ‖ε − ε_0(x_t, t, c)‖² on forget images, with c the null
    condition (`null`) or the images' own (`conditional`): training images both, no held-out data."""
    model = tiny_ddpm()
    draws = recorded_draws(monkeypatch, gradtau_module)
    method, theta0, theta = make("gradtau", model, alpha0=0.6, steps=4, ref_every=2, ref_batches=2, batch_size=8,
                                 ref_scale=3.0, reference=reference)
    batch = fixed_batch(model)
    batch.step = 2  # a re-estimation step: L_ref is estimated from the original, at step 2's draws
    f, r = batch.forget, batch.retain

    def loss(w, l_ref, a):
        forget = mse(f.noise, eps(model, w, f.x_t, f.t, f.cond))
        return a * torch.relu(l_ref - forget) ** 2 + (1 - a) * mse(r.noise, eps(model, w, r.x_t, r.t, r.cond))

    logs, after = take_step(method, batch)
    assert len(draws) == 2
    levels = []
    for b in draws:
        cond = null(model, len(b.x0)) if reference == "null" else classes(*[FORGET] * len(b.x0))
        assert torch.equal(b.cond.tensors["class_labels"], cond.tensors["class_labels"])
        assert all((method.data.forget_x0 == x).flatten(1).all(1).any() for x in b.x0)  # training forget images
        a = alphas_bar(model, b.t)
        with torch.no_grad():
            levels.append(mse(b.noise, eps(model, theta0, a.sqrt() * b.x0 + (1 - a).sqrt() * b.noise, b.t, cond)))
    l_ref = 3.0 * sum(levels).item() / len(levels)
    assert logs["L_ref"] == pytest.approx(l_ref, rel=1e-5)
    with torch.no_grad():
        assert mse(f.noise, eps(model, theta, f.x_t, f.t, f.cond)).item() < l_ref  # the hinge is active
    a = 0.6 * (1 - 2 / 4)
    value, grads = grad_of(lambda w: loss(w, l_ref, a), theta)
    got = a * max(0.0, l_ref - logs["forget"].item()) ** 2 + (1 - a) * logs["retain"].item()
    assert got == pytest.approx(value.item(), rel=1e-5)
    assert_update(after, theta, grads)
    assert method.lr_scale(2) == pytest.approx(1 - 0.9 * 2 / 4)
