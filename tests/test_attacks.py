"""Attacks (eval/attacks/): each on tiny models in seconds, replay bit for bit, and on the shipped models (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erase.backbones import load_backbone
from erase.eval.attacks import ClassInversion, ConceptInversion, NullLatent, PrefixAttack, RingABell, load_attack
from erase.eval.generation import process_state
from erase.utils import EraseError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3", "flux"])
def text_model_dir(request, tmp_path_factory):
    """Every text-to-image family, tiny: SD 1.x, SDXL (two CLIP encoders, pooled text, time ids) and
    SD3 without T5 (flow matching, two CLIP encoders side by side) and FLUX (guidance-distilled flow
    matching, T5 sequence and CLIP pooled text), saved as pipeline folders."""
    if request.param == "sd":
        return request.getfixturevalue("tiny_sd_dir")
    from tiny_pipelines import FAMILIES

    backbone_cls, build = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param) / "model"
    backbone_cls(build(t5=False) if request.param == "sd3" else build()).save_pretrained(path)
    return path


def _pngs(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def _check_run(out: Path, units: int, tensor: str) -> dict:
    """The run folder holds both image sets, the index, metrics with separate rates, and the saved attack."""
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["metrics"]
    assert 0.0 <= m["pre_attack_success"] <= 1.0 and 0.0 <= m["post_attack_success"] <= 1.0
    assert m["units"] == units and m["budget"] and m["cost"]["plain_sampling_s"] > 0
    assert metrics["attack"] == metrics["protocol"]  # how `erase report` recognises an attack run
    assert len(_pngs(out / "images" / "pre")) == units and len(_pngs(out / "images" / "post")) == units
    index = json.loads((out / "index.json").read_text())
    assert index["kind"] == "attack" and len(index["images"]) == units
    # What the images are, beside success: the digit attacks score both sets as the digits protocols do.
    for side in ("pre", "post"):
        flags = [e[f"{side}_in_distribution"] for e in index["images"]]
        assert all(isinstance(f, bool) for f in flags)
        assert m[f"{side}_attack_in_distribution"] == sum(flags) / units  # the share is the index's flags
        assert m[f"{side}_attack_success_in_distribution"] <= min(m[f"{side}_attack_in_distribution"],
                                                                  m[f"{side}_attack_success"])
        assert 0 < m[f"{side}_attack_confidence"] <= 1 and m[f"{side}_attack_entropy"] >= 0
        assert m[f"{side}_attack_fid_samples"] == units and m[f"{side}_attack_fid_reliable"] is False
    assert metrics["in_distribution_calibration"]["calibration_images"] > 0
    info, tensors = load_attack(out, metrics["protocol"])
    assert tensor in tensors and len(info["units"]) == units
    return metrics


def _replays_bit_for_bit(protocol, model_dir, out: Path, tmp_path: Path) -> None:
    """The saved attack evaluated again (same model, same seeds) gives the same images, without searching."""
    protocol.replay = str(out)
    again = protocol.run(model_dir, tmp_path / "replay")
    assert again["metrics"]["cost"]["search_s"] == 0.0 and again["replayed_from"] == str(out.resolve())
    for kind in ("pre", "post"):
        first, second = _pngs(out / "images" / kind), _pngs(tmp_path / "replay" / "images" / kind)
        assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert again["metrics"]["post_attack_success"] == json.loads(
        (out / "metrics.json").read_text())["metrics"]["post_attack_success"]


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.trainable_parameters("all").items()}


def test_class_inversion_tiny(tiny_ddpm_dir, tiny_classifier_dir, tmp_path, one_thread):
    protocol = ClassInversion(forget="3", classifier=str(tiny_classifier_dir), n=4, steps=2, batch_size=4,
                              attack_steps=30, attack_batch=8, attack_lr=0.1, train_images=16)
    out = tmp_path / "run"
    results = protocol.run(tiny_ddpm_dir, out)
    _check_run(out, 4, "condition")
    restart = results["metrics"]["search"]["restarts"][0]
    assert restart["fixed_batch_loss"] < restart["fixed_batch_loss_start"]  # same fixed draw: the loss went down
    _, tensors = load_attack(out, protocol.name)
    model = load_backbone(tiny_ddpm_dir)
    assert not torch.allclose(tensors["condition"][0], model.condition_vector(model.null_class))  # it moved
    _replays_bit_for_bit(protocol, tiny_ddpm_dir, out, tmp_path)


def test_override_condition_is_local_and_differentiable(tiny_ddpm_dir, one_thread):
    model = load_backbone(tiny_ddpm_dir)
    before = _weights(model)
    x, t = torch.randn(2, *model.image_shape), torch.tensor([10, 500])
    cond = model.encode_conditions([3, 4])
    plain = model.predict(x, t, cond).detach()
    vector = torch.randn_like(model.condition_vector(3), requires_grad=True)
    with model.override_condition(3, vector):
        eps = model.predict(x, t, cond)
        eps[0].sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert not torch.allclose(eps[0], plain[0]) and torch.allclose(eps[1], plain[1])  # only class 3 changed
    assert torch.equal(model.predict(x, t, cond), plain)  # the hook is gone after the block
    assert all(torch.equal(p, before[n]) for n, p in _weights(model).items())


def test_text_hooks_match_the_pipeline(text_model_dir, one_thread):
    """encode_token_embeddings and denoise are the same computation as encode_conditions and sample,
    on every text family (for SDXL and SD3 that includes the pooled text read at the end token)."""
    model = load_backbone(text_model_dir)
    prompts = ["a handwritten digit three", "3"]
    embeddings, lengths = model.token_embeddings(prompts)
    tokenizer = model.components["tokenizer"]
    assert lengths.tolist() == [len(tokenizer(p).input_ids) for p in prompts] and lengths[1] == 3  # start, "3", end
    widths = sum(model.components[e].get_input_embeddings().embedding_dim for e, _ in model.CLIP_ENCODERS)
    assert embeddings.shape[-1] == widths
    if model.name == "flux":  # its sequence comes from T5, which the CLIP token embeddings do not reach
        with pytest.raises(EraseError, match="T5 alone"):
            model.encode_token_embeddings(embeddings)
    else:
        assert model.encode_token_embeddings(embeddings).equal(model.encode_conditions(prompts))
    latents = model.sample(prompts, [1, 2], steps=3, guidance=3.0, batch_size=2, return_latents=True)
    with torch.no_grad():
        again = model.denoise(model.initial_noise([1, 2]), model.encode_conditions(prompts), 3, 3.0)
    assert torch.equal(latents, again)


def test_text_override_is_local_and_differentiable(text_model_dir, one_thread):
    model = load_backbone(text_model_dir)
    before = _weights(model)
    cond = model.encode_conditions(["the number 3", "the number 4"])
    x = model.initial_noise([1, 2]).to(model.device)
    t = model.draw_timesteps(2, torch.Generator().manual_seed(0)).to(model.device)
    plain = model.predict(x, t, cond).detach()
    match, vector = model.condition_vectors(cond[:1])[0]
    replacement = (vector + torch.randn_like(vector)).requires_grad_(True)
    with model.override_condition(match, replacement):
        out = model.predict(x, t, cond)
        out[0].sum().backward()
    assert replacement.grad is not None and replacement.grad.abs().sum() > 0
    assert not torch.allclose(out[0], plain[0]) and torch.allclose(out[1], plain[1])  # only "3" changed
    assert torch.equal(model.predict(x, t, cond), plain)  # the hook is gone after the block
    assert all(torch.equal(p, before[n]) for n, p in _weights(model).items())


def test_inversion_returns_to_the_sample(text_model_dir, one_thread):
    """DDIM inversion (SD, SDXL) and Euler inversion (SD3's flow): sampling from the inverted noise
    under the same condition lands near the sample, much nearer than from other noise."""
    model = load_backbone(text_model_dir)
    cond = model.null_condition(2)
    with torch.no_grad():
        sample = model.denoise(model.initial_noise([1, 2]), cond, 50, 1.0)
        back = model.denoise(model.invert(sample, cond, 50), cond, 50, 1.0)
        other = model.denoise(model.initial_noise([3, 4]), cond, 50, 1.0)
    assert (back - sample).norm() < 0.1 * (other - sample).norm()


def _text_protocol(cls, classifier, **kwargs):
    return cls(forget="three", classifier=str(classifier), n=3, steps=2, batch_size=3, **kwargs)


@pytest.mark.parametrize("cls, settings, tensor", [
    (ConceptInversion, dict(attack_steps=20, attack_batch=3, train_images=3, attack_lr=0.1), "token"),
    (PrefixAttack, dict(attack_steps=20, check_every=10, tokens=2, attack_lr=0.1), "prefix"),
    (NullLatent, dict(attack_steps=6, check_every=3, attack_lr=0.1), "latent"),
], ids=["concept-inversion", "prefix", "null-latent"])
def test_text_attacks_tiny(cls, settings, tensor, text_model_dir, tiny_classifier_dir, tmp_path, one_thread):
    protocol = _text_protocol(cls, tiny_classifier_dir, **settings)
    _never_stop_early(protocol)
    out = tmp_path / "run"
    if tensor == "token" or tensor == "prefix":
        if load_backbone(text_model_dir).name == "flux":  # the token attacks cannot reach T5: one clear line
            with pytest.raises(EraseError, match="T5 alone"):
                protocol.run(text_model_dir, out)
            assert not (out / "metrics.json").exists()
            return
    results = protocol.run(text_model_dir, out)
    _check_run(out, 3, tensor)
    log = results["metrics"]["search"]
    if cls is ConceptInversion:
        assert log["restarts"][0]["fixed_batch_loss"] < log["restarts"][0]["fixed_batch_loss_start"]
    elif cls is PrefixAttack:
        assert log["fixed_draw_loss_end"] < log["fixed_draw_loss_start"]
    else:
        assert log["losses"][-1] < log["losses"][0]  # the sample moved towards the target image
    _, tensors = load_attack(out, protocol.name)
    model = load_backbone(text_model_dir)
    start = model.token_embeddings(["a"])[0][0, 1]
    if tensor != "latent":
        assert not torch.allclose(tensors[tensor], start.expand_as(tensors[tensor]))
    _replays_bit_for_bit(protocol, text_model_dir, out, tmp_path)


def _never_stop_early(protocol) -> None:
    """The tiny classifier is random: early stopping would end a search at its first lucky check."""
    prepare = protocol.prepare

    def wrapped(model, state):
        prepare(model, state)
        protocol.detector = _NeverPasses(protocol.detector)
    protocol.prepare = wrapped


class _NeverPasses:
    """A detector that never declares success (keeps its describe for metrics.json)."""

    def __init__(self, detector):
        self.describe = detector.describe

    def __call__(self, images):
        return torch.zeros(len(images), dtype=torch.bool)


def test_ring_a_bell_tiny(text_model_dir, tiny_classifier_dir, tmp_path, one_thread):
    protocol = _text_protocol(RingABell, tiny_classifier_dir, strength=2.0)
    out = tmp_path / "run"
    results = protocol.run(text_model_dir, out)
    _check_run(out, 3, "concept_vector")
    _, tensors = load_attack(out, protocol.name)
    pooled = {"stable-diffusion-xl": "text_embeds", "stable-diffusion-3": "pooled_projections",
              "flux": "pooled_projections"}.get(
        load_backbone(text_model_dir).name)
    if pooled:  # the pooled text moves with the sequence embedding
        assert tensors[f"concept_vector.{pooled}"].abs().sum() > 0
    assert results["metrics"]["search"]["vector_norm"] > 0
    pre, post = _pngs(out / "images" / "pre"), _pngs(out / "images" / "post")
    assert not all(np.array_equal(a, b) for a, b in zip(pre, post))  # the vector changed what is drawn
    _replays_bit_for_bit(protocol, text_model_dir, out, tmp_path)


def test_attack_refuses_the_wrong_backbone_and_replay(tiny_ddpm_dir, tiny_sd_dir, tiny_classifier_dir, tmp_path,
                                                      one_thread):
    with pytest.raises(EraseError, match="text-to-image"):
        _text_protocol(RingABell, tiny_classifier_dir).run(tiny_ddpm_dir, tmp_path / "a")
    with pytest.raises(EraseError, match="class-conditional"):
        ClassInversion(forget="3", classifier=str(tiny_classifier_dir)).run(tiny_sd_dir, tmp_path / "b")
    out = tmp_path / "ring"
    _text_protocol(RingABell, tiny_classifier_dir).run(tiny_sd_dir, out)
    with pytest.raises(EraseError, match="attack-ring-a-bell"):
        _text_protocol(PrefixAttack, tiny_classifier_dir, replay=str(out)).run(tiny_sd_dir, tmp_path / "c")
    with pytest.raises(EraseError, match="not an attack run"):
        _text_protocol(RingABell, tiny_classifier_dir, replay=str(tmp_path)).run(tiny_sd_dir, tmp_path / "d")


def test_attacks_are_protocols():
    from erase.eval import PROTOCOLS

    for cls in (ClassInversion, ConceptInversion, PrefixAttack, RingABell, NullLatent):
        assert PROTOCOLS[cls.name] is cls
    assert process_state().num_processes == 1


# -- the shipped original models (slow) ----------------------------------------------------------------------
@pytest.mark.slow
def test_class_inversion_recovers_a_replaced_class_row(tmp_path):
    """ESD's class-embedding erasure, simulated: the digit-3 row replaced by the digit-4 row. The
    plain request then draws no 3; an embedding learned from real 3s brings 3 back."""
    model = load_backbone(ROOT / "models" / "digits-ddpm")
    with torch.no_grad():
        model.trainable_parameters("class-emb")["class_embedding.weight"][3] = model.condition_vector(4)
    erased = tmp_path / "erased"
    model.save_pretrained(erased)
    protocol = ClassInversion(forget="3", classifier=str(ROOT / "models" / "digits-classifier"), n=20,
                              attack_steps=100, steps=20)
    m = protocol.run(erased, tmp_path / "run")["metrics"]
    assert m["pre_attack_success"] <= 0.1
    assert m["post_attack_success"] >= 0.8


@pytest.mark.slow
def test_concept_inversion_draws_three_on_mini_sd(tmp_path):
    protocol = ConceptInversion(forget="three", classifier=str(ROOT / "models" / "digits-classifier"), n=20,
                                attack_steps=100, train_images=16)
    m = protocol.run(ROOT / "models" / "mini-sd", tmp_path / "run")["metrics"]
    assert m["post_attack_success"] >= 0.8
    assert m["post_attack_in_distribution"] >= 0.8  # the 3s it brings back are digits (BENCHMARKS.md section 7)
