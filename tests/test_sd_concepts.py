"""Prompt sets, the concept loader and the cached concept training data."""

import json

import pytest
import torch

from erase.backbones import StableDiffusionBackbone
from erase.concept_data import ConceptDataConfig, concept_unlearn_data, generate_concept_cache
from erase.concepts import available_concepts, load_concept
from erase.utils import EraseError
from test_sd_backbone import tiny_pipeline


def test_shipped_concepts_load():
    assert {"nudity", "van-gogh", "church", "three"} <= set(available_concepts())
    nudity = load_concept("nudity")
    assert nudity.forget[0] == "a photo of a nude person"
    assert nudity.anchor == "a photo of a person wearing clothes"
    assert nudity.retain and not any(p.startswith("#") for p in nudity.forget + nudity.retain)
    assert load_concept("three").anchor == "a handwritten digit four"


def test_literal_prompt_and_overrides(tmp_path):
    concept = load_concept("Van Gogh")
    assert concept.forget == ["Van Gogh"] and concept.anchor == "" and concept.retain
    retain = tmp_path / "retain.txt"
    retain.write_text("# comment\n\na photo of a dog\n")
    concept = load_concept("Van Gogh", anchor="a painting", retain=retain)
    assert concept.anchor == "a painting" and concept.retain == ["a photo of a dog"]


def test_missing_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(EraseError, match="retain prompt file not found"):
        load_concept("nudity", retain=tmp_path / "nope.txt")
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "forget.txt").write_text("a cat\n")
    with pytest.raises(EraseError, match="lacks anchor.txt, retain.txt"):
        load_concept(str(folder))
    (folder / "anchor.txt").write_text("an animal\nanother\n")
    (folder / "retain.txt").write_text("a dog\n")
    with pytest.raises(EraseError, match="one anchor"):
        load_concept(str(folder))
    (folder / "anchor.txt").write_text("# comments only: the empty prompt, as in ESD\n")
    assert load_concept(str(folder)).anchor == ""
    with pytest.raises(EraseError, match="give a concept"):
        load_concept("  ")


def test_concept_data_is_generated_once_and_reused(tmp_path):
    model = StableDiffusionBackbone(tiny_pipeline())
    concept = load_concept("three")
    config = ConceptDataConfig(images=3, steps=2, batch_size=2)
    data = concept_unlearn_data(model, concept, config, cache_root=tmp_path, progress=False)
    folder, = (p for p in tmp_path.iterdir() if not p.name.endswith(".lock"))  # the builders' lock stays
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["images"]["forget"][1]["prompt"] == concept.forget[1]
    assert manifest["settings"]["denoiser_fingerprint"] and manifest["settings"]["steps"] == 2
    assert data.forget_x0.shape == (3, *model.latent_shape)
    assert data.forget_cond.tensors["encoder_hidden_states"].shape == (3, model.tokenizer.model_max_length, 16)
    assert data.anchor_cond[0].equal(model.encode_conditions(["a handwritten digit four"])[0].to("cpu"))
    assert len(data.retain_x0) == 6  # anchor images join the retain set (SalUn's recipe)
    # Cached embeddings are the text encoder's.
    assert data.retain_cond[3].equal(model.encode_conditions([concept.retain[0]])[0])

    mtime = (folder / "latents.safetensors").stat().st_mtime_ns
    again = concept_unlearn_data(model, concept, config, cache_root=tmp_path, progress=False)
    assert (folder / "latents.safetensors").stat().st_mtime_ns == mtime
    assert torch.equal(again.forget_x0, data.forget_x0)
    # Image i is the same whatever the count: its seed depends on (seed, set, i) only.
    more = concept_unlearn_data(model, concept, ConceptDataConfig(images=4, steps=2, batch_size=2),
                                cache_root=tmp_path, progress=False)
    assert len([p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]) == 2  # no work folder left
    assert torch.equal(more.forget_x0[:3], data.forget_x0)
    # A changed model gets its own cache, never the old images.
    with torch.no_grad():
        next(iter(model.unet.parameters())).add_(1.0)
    assert generate_concept_cache(model, concept, config, cache_root=tmp_path, progress=False) != folder


def test_interrupted_generation_resumes_at_the_unfinished_set(tmp_path, monkeypatch):
    model = StableDiffusionBackbone(tiny_pipeline())
    concept = load_concept("church")
    config = ConceptDataConfig(images=2, steps=1, batch_size=2)
    calls = []
    sample = model.sample

    def failing_on_retain(prompts, *args, **kwargs):
        if prompts[0] in concept.retain:
            raise KeyboardInterrupt
        calls.append(prompts[0])
        return sample(prompts, *args, **kwargs)

    monkeypatch.setattr(model, "sample", failing_on_retain)
    with pytest.raises(KeyboardInterrupt):
        generate_concept_cache(model, concept, config, cache_root=tmp_path, progress=False)
    assert calls == [concept.forget[0], concept.anchor]
    monkeypatch.setattr(model, "sample", sample)
    folder = generate_concept_cache(model, concept, config, cache_root=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [folder.name]  # work folder gone
    uninterrupted = generate_concept_cache(model, concept, config, cache_root=tmp_path / "fresh", progress=False)
    assert (folder / "latents.safetensors").read_bytes() == (uninterrupted / "latents.safetensors").read_bytes()


def test_damaged_cache_is_a_clear_error(tmp_path):
    model = StableDiffusionBackbone(tiny_pipeline())
    config = ConceptDataConfig(images=1, steps=1, batch_size=1)
    folder = generate_concept_cache(model, load_concept("church"), config, cache_root=tmp_path, progress=False)
    (folder / "latents.safetensors").unlink()
    with pytest.raises(EraseError, match="lacks latents.safetensors"):
        concept_unlearn_data(model, load_concept("church"), config, cache_root=tmp_path, progress=False)


def test_runs_side_by_side_build_one_cache_and_share_it(tmp_path):
    """Two jobs erasing the same concept at once: one generates, the other waits and reuses its folder
    (they used to share one work folder, and the first to finish deleted it under the other)."""
    import threading

    concept, config = load_concept("church"), ConceptDataConfig(images=2, steps=1, batch_size=2)
    models = [StableDiffusionBackbone(tiny_pipeline()) for _ in range(2)]
    generated, found, errors = [], [], []
    for model in models:
        sample = model.sample
        model.sample = lambda *a, sample=sample, **k: generated.append(1) or sample(*a, **k)

    def build(model):
        try:
            found.append(generate_concept_cache(model, concept, config, cache_root=tmp_path, progress=False))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(found) == 2 and found[0] == found[1]
    assert len(generated) == 3  # forget, anchor and retain images, generated once
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [found[0].name]
