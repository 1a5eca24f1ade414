"""Every method on a tiny class-conditional DDPM: it trains what it should, nothing else, and resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from erase.backbones import load_backbone
from erase.methods import METHODS
from erase.loop import unlearn
from conftest import assert_trained_only

TINY = dict(steps=3, batch_size=8, checkpoint_every=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures in conftest.py


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_its_group_only(name, tiny_model, tmp_path):
    before = load_backbone(tiny_model).unet.state_dict()
    out = unlearn(tiny_model, name, "3", tmp_path / "out", params="attn", progress=False, **TINY)
    model = load_backbone(out)
    after = model.unet.state_dict()
    assert_trained_only(set(model.trainable_parameters("attn")), before, after, load_file(out / "delta.safetensors"), name)
    info = json.loads((out / "erase_config.json").read_text())
    assert info["method"] == name and info["params"] == "attn" and info["steps"] == 3
    assert info["final_losses"] and all(math.isfinite(v) for v in info["final_losses"].values())
    assert info["seconds_per_step"] > 0 and info["peak_memory_mb"] > 0


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_equals_uninterrupted(name, tiny_model, tmp_path):
    options = dict(steps=4, batch_size=8, checkpoint_every=2, progress=False)
    full = load_backbone(unlearn(tiny_model, name, "3", tmp_path / "full", **options)).unet.state_dict()
    ckpt = unlearn(tiny_model, name, "3", tmp_path / "resumed", stop_after=3, **options)
    assert ckpt.name == "step-0000003" and not (tmp_path / "resumed").exists()
    resumed = load_backbone(unlearn(tiny_model, name, "3", tmp_path / "resumed", **options)).unet.state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full), f"{name}: resumed run differs"


def test_save_load_gives_identical_samples(tiny_model, tmp_path):
    model = load_backbone(tiny_model)
    out = unlearn(model, "eupmu", "3", tmp_path / "out", progress=False, **TINY)
    loaded = load_backbone(out)
    args = dict(classes=[3, 3, 5], seeds=[0, 1, 2], steps=4, batch_size=4)
    assert torch.equal(model.sample(**args), loaded.sample(**args))
    # The delta alone turns the base model into the unlearned one.
    base = load_backbone(tiny_model)
    base.unet.load_state_dict(load_file(out / "delta.safetensors"), strict=False)
    assert torch.equal(base.sample(**args), loaded.sample(**args))


def test_salun_mask_keeps_the_requested_share(tiny_model, tmp_path):
    model = load_backbone(tiny_model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    unlearn(model, "salun", "3", tmp_path / "out", progress=False, mask_ratio=0.1, **TINY)
    moved = sum((v != before[k]).sum().item() for k, v in model.unet.state_dict().items())
    total = sum(v.numel() for v in before.values())
    assert 0 < moved <= 0.1 * total + 1


def test_mox_extrapolates_away_from_memorization(tiny_model, tmp_path):
    base = load_backbone(tiny_model).unet.state_dict()
    runs = {a: load_backbone(unlearn(tiny_model, "mox", "3", tmp_path / f"a{a}", alpha=a, progress=False,
                                     **TINY)).unet.state_dict() for a in (1.0, 2.0)}
    # θ_u − θ_0 = α(θ_0 − θ_m): doubling α doubles the step, with the same memorization run.
    for k in base:
        torch.testing.assert_close(runs[2.0][k] - base[k], 2 * (runs[1.0][k] - base[k]), atol=1e-6, rtol=1e-4)


def test_esd_samples_its_own_xt(tiny_model, tmp_path):
    from erase.utils import step_generator

    model = load_backbone(tiny_model)
    cond = model.encode_conditions([3, 3])
    x0, t0 = model.partial_sample(cond, step_generator(0), steps=4, stop=0, guidance=3.0)
    x2, t2 = model.partial_sample(cond, step_generator(0), steps=4, stop=2, guidance=3.0)
    assert torch.equal(x0, model.initial_noise(torch.randint(2**62, (2,), generator=step_generator(0)).tolist()))
    assert (t2 < t0).all() and not torch.equal(x0, x2)  # two DDIM steps later, closer to an image

    options = dict(steps=4, batch_size=4, checkpoint_every=2, progress=False, sample_steps=3)
    sampled = load_backbone(unlearn(tiny_model, "esd", "3", tmp_path / "s", xt="sample", **options)).unet.state_dict()
    cached = load_backbone(unlearn(tiny_model, "esd", "3", tmp_path / "c", **options)).unet.state_dict()
    assert any(not torch.equal(sampled[k], cached[k]) for k in sampled)
    unlearn(tiny_model, "esd", "3", tmp_path / "r", xt="sample", stop_after=3, **options)
    resumed = load_backbone(unlearn(tiny_model, "esd", "3", tmp_path / "r", xt="sample", **options)).unet.state_dict()
    assert all(torch.equal(sampled[k], resumed[k]) for k in sampled)


@pytest.mark.parametrize("name", ["eupmu", "lur"])
def test_gradient_checkpointing_trains_the_same_weights(name, tiny_model, tmp_path):
    original = load_backbone(tiny_model).unet.state_dict()
    plain = load_backbone(unlearn(tiny_model, name, "3", tmp_path / "a", progress=False, **TINY)).unet.state_dict()
    ckpt = load_backbone(unlearn(tiny_model, name, "3", tmp_path / "b", progress=False, gradient_checkpointing=True,
                                 **TINY)).unet.state_dict()

    def mean_abs(x, y):
        return sum((x[k] - y[k]).abs().sum() for k in x) / sum(x[k].numel() for k in x)

    # Recomputed activations round differently, and Adam's first steps turn a rounding difference in a
    # near-zero gradient entry into a full step, so compare on average (lur: second order through
    # the checkpointed graph; its first-order variant differs ~8x more than this bound).
    assert mean_abs(plain, ckpt) < 1e-3 * mean_abs(plain, original)


def test_batch_of_one_only_for_forget_only_methods(tiny_model, tmp_path):
    from erase.utils import EraseError

    with pytest.raises(EraseError, match="--batch-size must be at least 2"):
        unlearn(tiny_model, "rl", "3", tmp_path / "rl", steps=1, batch_size=1, progress=False)
    unlearn(tiny_model, "esd", "3", tmp_path / "esd", steps=1, batch_size=1, progress=False)  # ESD's own batch


def test_ema_saves_the_warm_up_average_of_the_trained_weights(tiny_model, tmp_path):
    """--ema-decay: the saved weights are the EMA (diffusers' warm-up) of the weights after each step,
    only the trained group moves, and a resumed run gives the same average."""
    decay, options = 0.5, dict(steps=4, batch_size=8, params="attn", checkpoint_every=100, progress=False)
    per_step = []
    for k in (1, 2, 3):  # each call resumes the last and stops with a checkpoint of step k
        ckpt = unlearn(tiny_model, "finetune", "3", tmp_path / "plain", stop_after=k, **options)
        per_step.append(load_file(ckpt / "params.safetensors"))
    last = load_backbone(unlearn(tiny_model, "finetune", "3", tmp_path / "plain", **options)).unet.state_dict()
    per_step.append({k: last[k] for k in per_step[0]})
    expected = dict(per_step[0])  # the first update copies the weights
    for n, weights in enumerate(per_step[1:], start=2):
        d = min(decay, n / (9 + n))
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}

    before = load_backbone(tiny_model).unet.state_dict()
    out = unlearn(tiny_model, "finetune", "3", tmp_path / "ema", ema_decay=decay, **options)
    model = load_backbone(out)
    averaged = model.unet.state_dict()
    assert_trained_only(set(model.trainable_parameters("attn")), before, averaged,
                        load_file(out / "delta.safetensors"), "finetune with EMA")
    for k in expected:
        torch.testing.assert_close(averaged[k], expected[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(averaged[k], last[k]) for k in expected), "the EMA saved the last weights"
    assert json.loads((out / "erase_config.json").read_text())["ema_final_decay"] == min(decay, 4 / 13)

    unlearn(tiny_model, "finetune", "3", tmp_path / "resumed", ema_decay=decay, stop_after=3, **options)
    resumed = load_backbone(unlearn(tiny_model, "finetune", "3", tmp_path / "resumed", ema_decay=decay,
                                    **options)).unet.state_dict()
    assert all(torch.equal(averaged[k], resumed[k]) for k in averaged), "the resumed EMA differs"


def test_esd_retain_weight_keeps_the_retain_predictions(tiny_model, tmp_path):
    """ESD's optional retain term: half of each batch is retain samples, and the retain classes'
    predictions stay nearer the original's than plain ESD leaves them."""
    options = dict(steps=20, batch_size=8, lr=1e-3, params="all", progress=False)
    plain = load_backbone(unlearn(tiny_model, "esd", "3", tmp_path / "plain", **options))
    out = unlearn(tiny_model, "esd", "3", tmp_path / "kept", retain_weight=100.0, **options)
    kept, original = load_backbone(out), load_backbone(tiny_model)
    assert {"esd", "retain"} <= set(json.loads((out / "erase_config.json").read_text())["final_losses"])
    drift = retain_drift(original, {"plain": plain, "kept": kept})
    assert drift["kept"] < 0.5 * drift["plain"], drift


def test_retain_reference_pulls_a_later_stage_back_to_the_given_model(tiny_model, tmp_path):
    """`retain_reference`: the retain term keeps a named model's predictions, not the input's.

    A second stage that distils the original undoes most of what a first stage changed on the
    retained digits; distilling its own input (the default reference) leaves it where it was.
    """
    options = dict(steps=20, batch_size=8, lr=1e-3, params="all", progress=False)
    moved = unlearn(tiny_model, "rl", "3", tmp_path / "moved", **options)
    back = unlearn(moved, "finetune", "3", tmp_path / "back", retain_target="reference",
                   retain_reference=str(tiny_model), **options)
    stayed = unlearn(moved, "finetune", "3", tmp_path / "stayed", retain_target="reference", **options)
    assert not load_file(stayed / "delta.safetensors")
    drift = retain_drift(load_backbone(tiny_model), {"moved": load_backbone(moved), "back": load_backbone(back)})
    assert drift["back"] < 0.5 * drift["moved"], drift
    assert json.loads((back / "erase_config.json").read_text())["terms"]["retain"] == {
        "teacher": "original", "samples": "images", "paths": 256, "model": str(tiny_model)}


def retain_drift(original, models: dict) -> dict[str, float]:
    """Mean squared change of the retained digits' predictions against `original`, per model."""
    from erase.utils import step_generator

    g = step_generator(0)
    cond = original.encode_conditions([0, 1, 2, 4, 5, 6, 7, 8, 9] * 4)
    x_t = torch.randn(len(cond), *original.image_shape, generator=g)
    t = torch.randint(original.scheduler.config.num_train_timesteps, (len(cond),), generator=g)
    with torch.no_grad():
        ref = original.predict(x_t, t, cond)
        return {name: (m.predict(x_t, t, cond) - ref).pow(2).mean().item() for name, m in models.items()}


def test_retain_target_reference_replaces_the_retain_images_targets(tiny_model, tmp_path):
    """`retain_target="reference"`: every retain term targets the input model's own predictions.

    `finetune` is its retain term alone, so against those targets its loss starts at exactly 0 and
    it has nothing to learn: the weights stay where they were, while the data target moves them. A
    method with a forget term (`rl`) keeps the retain digits' predictions nearer the original's.
    """
    options = dict(steps=6, batch_size=8, lr=1e-3, params="all", progress=False)
    still = unlearn(tiny_model, "finetune", "3", tmp_path / "ft-ref", retain_target="reference", **options)
    moved = unlearn(tiny_model, "finetune", "3", tmp_path / "ft-data", **options)
    assert not load_file(still / "delta.safetensors") and load_file(moved / "delta.safetensors")
    history = [json.loads(line) for line in (still / "loss_history.jsonl").read_text().splitlines()]
    assert [h["retain"] for h in history] == [0.0] * len(history)

    options["steps"] = 20
    data = load_backbone(unlearn(tiny_model, "rl", "3", tmp_path / "rl-data", **options))
    ref = load_backbone(unlearn(tiny_model, "rl", "3", tmp_path / "rl-ref", retain_target="reference", **options))
    drift = retain_drift(load_backbone(tiny_model), {"data": data, "reference": ref})
    assert drift["reference"] < 0.5 * drift["data"], drift


def test_sampling_paths_are_the_samplers_own_states(tiny_model):
    """`sampling_path` keeps what the guided sampler feeds the denoiser: the first state is the initial
    noise, the timesteps are the sampler's, and one more step from the last state is `denoise`'s end.
    `SamplingPaths.draw` asks half its states under their retain condition and half under the null one."""
    from erase.unlearn_data import sampling_paths
    from erase.utils import step_generator

    model = load_backbone(tiny_model)
    cond = model.encode_conditions([0, 1, 2])
    initial = model.initial_noise([5, 6, 7])
    states, times = model.sampling_path(initial, cond, 4, 3.0)
    sampler = model.sampling_scheduler(4)
    assert states.shape == (4, 3, *model.sample_shape)
    assert torch.equal(states[0], initial) and torch.equal(times, sampler.timesteps[:, None].expand(4, 3))
    with torch.no_grad():
        last = sampler.step(model.guided_prediction(states[-1], times[-1], cond, 3.0), times[-1, 0], states[-1])
        assert torch.allclose(last.prev_sample, model.denoise(initial, cond, 4, 3.0), atol=1e-6)

    paths = sampling_paths(model, model.frozen_copy(), model.encode_conditions([0, 1, 2, 4]).to("cpu"), 3, seed=0)
    assert paths.states.shape[:2] == (3, model.sample_defaults["steps"])
    batch = paths.draw(6, step_generator(0))
    labels = batch.cond.tensors["class_labels"].tolist()
    assert set(labels[:3]) <= {0, 1, 2, 4} and labels[3:] == [model.null_class] * 3
    assert batch.target is None and batch.x0 is None, "a state has no data target; the reference gives it"
    for x, t in zip(batch.x_t, batch.t):
        assert any(torch.equal(x, s) for s in paths.states[paths.timesteps == t]), "every state is on a path"


def test_trajectory_retain_samples_pull_the_sampling_path_back(tiny_model, tmp_path):
    """`retain_samples="trajectories"`: a repair stage that distils the original on its own guided
    sampling paths brings an altered model's guided predictions along those paths most of the way
    back to the original's; the paths it drew are recorded."""
    options = dict(steps=20, batch_size=8, lr=1e-3, params="all", progress=False)
    moved = unlearn(tiny_model, "rl", "3", tmp_path / "moved", **options)
    back = unlearn(moved, "finetune", "3", tmp_path / "back", retain_target="reference",
                   retain_reference=str(tiny_model), retain_samples="trajectories", trajectories=16, **options)
    original = load_backbone(tiny_model)
    guidance = original.sample_defaults["guidance"]
    cond = original.encode_conditions([0, 1, 2, 4, 5, 6, 7, 8, 9])
    states, times = original.sampling_path(original.initial_noise(range(100, 109)), cond, 10, guidance)

    def path_error(model) -> float:
        with torch.no_grad():
            return sum((model.guided_prediction(x, t, cond, guidance)
                        - original.guided_prediction(x, t, cond, guidance)).pow(2).mean().item()
                       for x, t in zip(states, times))

    moved_error, back_error = path_error(load_backbone(moved)), path_error(load_backbone(back))
    assert back_error < 0.5 * moved_error, (back_error, moved_error)
    recorded = json.loads((back / "erase_config.json").read_text())
    assert recorded["data"]["retain_samples"] == {"paths": 16, "steps": original.sample_defaults["steps"],
                                                  "guidance": guidance, "seed": 0}
    assert recorded["terms"]["retain"]["samples"] == "paths"
