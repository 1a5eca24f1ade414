"""The class-conditional DDPM backbone: guidance, seeds, save/load and its errors."""

import json

import pytest
import torch

from erase.backbones import ClassConditionalDDPM, load_backbone
from erase.utils import EraseError

NAMES = ["zero", "one", "two", "three"]


def tiny_model(seed: int = 0) -> ClassConditionalDDPM:
    torch.manual_seed(seed)
    return ClassConditionalDDPM.create(NAMES, image_size=8, channels=1, block_out_channels=(8, 16),
                                       attention_levels=(False, True), norm_num_groups=4,
                                       num_train_timesteps=100)


def test_batched_guidance_equals_two_separate_forwards():
    model = tiny_model()
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor(40)
    cond = model.encode_conditions([0, 2, 3])
    with torch.no_grad():
        eps_c = model.predict(x, t, cond)
        eps_u = model.predict(x, t, model.null_condition(3))
        guided = model.guided_prediction(x, t, cond, guidance=3.0)
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eps_c, eps_u), "the null class must give a different prediction"


def test_ddim_step_uses_the_epsilon_of_the_clipped_x0():
    """The sampler clips x0 to [-1, 1] and steps with the ε that the clipped x0 implies (diffusers'
    default keeps the raw ε, which broke guided sampling of the digits model: models/README.md)."""
    model = tiny_model()
    sampler = model.sampling_scheduler(10)
    t, prev = sampler.timesteps[3], sampler.timesteps[4]
    g = torch.Generator().manual_seed(0)
    x, eps = 2 * torch.randn(2, 1, 8, 8, generator=g), 3 * torch.randn(2, 1, 8, 8, generator=g)
    a_t, a_prev = sampler.alphas_cumprod[t], sampler.alphas_cumprod[prev]
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    assert (x0.abs() == 1).float().mean() > 0.3  # the case that matters: much of x0 is clipped
    eps_clipped = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_clipped
    torch.testing.assert_close(sampler.step(eps, t, x).prev_sample, expected)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_image_depends_only_on_its_seed_not_on_the_request(eta):
    model = tiny_model()
    classes, seeds = [0, 1, 2, 3, 1], [11, 12, 13, 14, 15]
    together = model.sample(classes, seeds, steps=4, eta=eta, batch_size=4)
    alone = torch.cat([model.sample([c], [s], steps=4, eta=eta, batch_size=4) for c, s in zip(classes, seeds)])
    reversed_order = model.sample(classes[::-1], seeds[::-1], steps=4, eta=eta, batch_size=4).flip(0)
    assert torch.equal(together, alone)
    assert torch.equal(together, reversed_order)
    # Another compute batch size changes only float rounding.
    torch.testing.assert_close(model.sample(classes, seeds, steps=4, eta=eta, batch_size=2), together,
                               atol=1e-3, rtol=0)
    assert not torch.equal(together[0], together[1]), "different seeds must give different images"


def test_save_and_load_give_identical_samples(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m", note="test")
    loaded = load_backbone(tmp_path / "m")
    assert loaded.class_names == NAMES and loaded.info["note"] == "test"
    assert torch.equal(model.sample([1, 3], [5, 6], steps=3), loaded.sample([1, 3], [5, 6], steps=3))
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_class_names_and_ids():
    model = tiny_model()
    assert model.encode_conditions(["three", "1", 2]).tensors["class_labels"].tolist() == [3, 1, 2]
    assert model.null_condition(2).tensors["class_labels"].tolist() == [4, 4]
    with pytest.raises(EraseError, match="unknown class 'seven'.*0=zero"):
        model.class_index("seven")
    with pytest.raises(EraseError, match="out of range"):
        model.class_index(4)


def test_parameter_groups_and_missing_cross_attention():
    model = tiny_model()
    attn = model.trainable_parameters("attn")
    assert attn and all(".attentions." in n for n in attn)
    assert set(attn).isdisjoint(model.trainable_parameters("noattn"))
    # The semantic group and its older name: the class embedding is where the condition enters.
    assert list(model.trainable_parameters("condition")) == ["class_embedding.weight"]
    assert list(model.trainable_parameters("class-emb")) == ["class_embedding.weight"]
    rest = model.trainable_parameters("nocondition")
    assert "class_embedding.weight" not in rest and not any(n.startswith(("time_embedding.", "conv_out.")) for n in rest)
    with pytest.raises(EraseError, match="'xattn' does not exist for the class-ddpm backbone; choose one of all, condition"):
        model.trainable_parameters("xattn")


def test_mismatched_checkpoint_is_refused(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    meta_file = tmp_path / "m" / "erase_model.json"
    meta = json.loads(meta_file.read_text())
    meta["class_names"] = NAMES + ["four"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(EraseError, match="does not match: the UNet has 5 class embeddings.*but 5 class names"):
        load_backbone(tmp_path / "m")
    with pytest.raises(EraseError, match="does not exist"):
        load_backbone(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EraseError, match="not a model any backbone loads.*no erase_model.json.*Tried class-ddpm"):
        load_backbone(tmp_path / "empty")


def test_sample_argument_errors():
    model = tiny_model()
    with pytest.raises(EraseError, match="one seed per image"):
        model.sample([0, 1], [1])
    with pytest.raises(EraseError, match="steps must be at least 1"):
        model.sample([0], [1], steps=0)


def _out_of_memory_above(model, limit: int, monkeypatch) -> list[int]:
    """Make `model` fail as a GPU does when a batch above `limit` is drawn; returns the batches tried."""
    tried, draw = [], model._sample_batch

    def sample_batch(conditions, *args, **kwargs):
        tried.append(len(conditions))
        if len(conditions) > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return draw(conditions, *args, **kwargs)

    monkeypatch.setattr(model, "_sample_batch", sample_batch)
    return tried


def test_fit_batch_size_halves_until_a_batch_fits(monkeypatch):
    model = tiny_model()
    tried = _out_of_memory_above(model, 5, monkeypatch)
    assert model.fit_batch_size(1, start=32) == 4
    assert tried == [32, 16, 8, 4]
    tried.clear()
    assert model.fit_batch_size(1, start=4) == 4 and tried == [4]  # what fits is tried once


def test_fit_batch_size_says_when_not_even_one_image_fits(monkeypatch):
    model = tiny_model()
    _out_of_memory_above(model, 0, monkeypatch)
    with pytest.raises(EraseError, match="even one image"):
        model.fit_batch_size(1, start=8)


def test_other_errors_are_not_taken_for_a_full_memory(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(model, "_sample_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        model.fit_batch_size(1, start=8)


def test_choose_batch_size_keeps_the_cpu_batch_on_a_cpu_and_fits_one_on_a_gpu(monkeypatch):
    from erase.backbones.base import GPU_BATCH_START

    model = tiny_model()
    fits = []
    monkeypatch.setattr(model, "fit_batch_size", lambda cond, start, **options: fits.append((cond, start)) or 16)
    assert model.choose_batch_size(1, cpu_batch=7) == 7 and fits == []  # no probe on a CPU
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert model.choose_batch_size(1, cpu_batch=7) == 16 and fits == [(1, GPU_BATCH_START)]
