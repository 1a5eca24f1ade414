"""Robust erasure (erase/robust.py): the inner attack moves δ and lowers its loss, δ reaches only the
trained UNet's forget condition, and the option changes what a method learns (tiny models, seconds)."""

from __future__ import annotations

import pytest
import torch

from erase.backbones import load_backbone
from erase.methods.losses import noised
from erase.robust import AdversarialCondition
from erase.loop import unlearn
from erase.utils import step_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def _forget_batch(model, cond):
    g = step_generator(0)
    return noised(model, torch.randn(len(cond), *model.sample_shape, generator=g), cond, g)


def _inner_loss(adversary, forget, delta):
    """The inner attack's objective on one fixed draw, for a given δ."""
    g = step_generator(5)
    noise = torch.randn(forget.x0.shape, generator=g)
    t = adversary.model.draw_timesteps(len(forget.x0), g)
    target = adversary.model.training_target(forget.x0, noise, t)
    with torch.no_grad(), adversary._perturbed(forget.cond, delta):
        prediction = adversary.model.predict(adversary.model.add_noise(forget.x0, noise, t), t, forget.cond)
    return float(((prediction - target) ** 2).mean())


def _model(backbone, request):
    if backbone in ("ddpm", "sd"):
        return load_backbone(request.getfixturevalue(f"tiny_{backbone}_dir"))
    from tiny_pipelines import FAMILIES

    backbone_cls, build = FAMILIES[backbone]
    return backbone_cls(build())


@pytest.mark.parametrize("backbone", ["ddpm", "sd", "sdxl", "sd3", "flux"])
def test_inner_attack_and_where_delta_applies(backbone, request):
    model = _model(backbone, request)
    conditions = (model.encode_conditions([3, 3, 3, 3]) if backbone == "ddpm" else
                  model.encode_conditions(["three", "3", "three", "3"]))
    other = model.encode_conditions([5]) if backbone == "ddpm" else model.encode_conditions(["five"])
    forget = _forget_batch(model, conditions)
    reference = model.frozen_copy()
    weights = {n: p.detach().clone() for n, p in model.trainable_parameters().items()}
    adversary = AdversarialCondition(model, every=1, steps=25, lr=0.05, seed=0)

    adversary.refresh(forget, step=1)
    assert adversary.delta.abs().sum() > 0
    assert _inner_loss(adversary, forget, adversary.delta.detach()) < _inner_loss(
        adversary, forget, torch.zeros_like(adversary.delta))
    assert all(p.grad is None and torch.equal(p, weights[n]) for n, p in model.trainable_parameters().items())

    x, t = forget.x_t[:1], forget.t[:1]
    with torch.no_grad():
        plain = model.predict(x, t, conditions[:1])
        plain_other = model.predict(x, t, other)
        plain_frozen = model.predict(x, t, conditions[:1], denoiser=reference)
        with adversary.applied(1, forget):  # an adversarial step
            perturbed = model.predict(x, t, conditions[:1])
            assert torch.equal(model.predict(x, t, other), plain_other)  # other conditions: untouched
            assert torch.equal(model.predict(x, t, conditions[:1], denoiser=reference), plain_frozen)
        with adversary.applied(2, forget):  # a plain step
            again = model.predict(x, t, conditions[:1])
    assert not torch.allclose(perturbed, plain) and torch.equal(again, plain)


def test_robust_option_changes_what_the_method_learns(tiny_model, tmp_path):
    def trained(**options):
        out = unlearn(tiny_model, "esd", "3", tmp_path / str(len(options)), steps=4, batch_size=4, params="all",
                      lr=1e-3, progress=False, **options)
        return {n: p.detach() for n, p in load_backbone(out).trainable_parameters().items()}

    plain, robust = trained(), trained(terms={"robust": {"every": 1, "steps": 2}})
    assert any(not torch.equal(plain[n], robust[n]) for n in plain)


@pytest.mark.parametrize("backbone", ["ddpm", "sd"])
def test_adversarial_radius_keeps_each_row_of_delta_on_its_ball(backbone, request):
    model = _model(backbone, request)
    conditions = model.encode_conditions([3, 3]) if backbone == "ddpm" else model.encode_conditions(["three", "three"])
    forget = _forget_batch(model, conditions)
    plain = model.condition_vectors(conditions)[0][1]
    free = AdversarialCondition(model, every=1, steps=20, lr=0.5, seed=0)
    bounded = AdversarialCondition(model, every=1, steps=20, lr=0.5, seed=0, radius=0.05)
    free.refresh(forget, step=1)
    bounded.refresh(forget, step=1)
    ratio = lambda delta: (delta.norm(dim=-1) / plain.norm(dim=-1)).max().item()  # noqa: E731
    assert ratio(free.delta) > 0.05  # the search goes further when nothing bounds it ...
    assert 0 < ratio(bounded.delta) <= 0.05 + 1e-6  # ... and stays on the ball when bounded


def test_a_resumed_robust_run_equals_an_uninterrupted_one(tiny_model, tmp_path):
    """δ and its Adam state are checkpointed: the resumed run refreshes δ from where it was, not from zero."""
    options = dict(steps=6, batch_size=4, params="all", lr=1e-3, checkpoint_every=3, progress=False,
                   terms={"robust": {"every": 2, "steps": 2}})
    full = load_backbone(unlearn(tiny_model, "esd", "3", tmp_path / "full", **options)).trainable_parameters()
    unlearn(tiny_model, "esd", "3", tmp_path / "resumed", stop_after=3, **options)
    resumed = load_backbone(unlearn(tiny_model, "esd", "3", tmp_path / "resumed", **options)).trainable_parameters()
    assert all(torch.equal(full[n], resumed[n]) for n in full)
