"""The text-to-image backbones beyond SD 1.x (SDXL, and the flow-matching family) on tiny pipelines:
loading, conditions, sampling, and outputs that stock diffusers reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from erase.backbones import load_backbone
from tiny_pipelines import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family name, backbone class, pipeline folder saved by the backbone)."""
    backbone_cls, build = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param) / "model"
    backbone_cls(build()).save_pretrained(path)
    return request.param, backbone_cls, path


def test_loads_by_probing_and_stock_diffusers_loads_the_folder(family):
    name, backbone_cls, path = family
    model = load_backbone(path)
    assert type(model) is backbone_cls and model.info["source"] == str(path)
    assert not any(p.requires_grad for e in backbone_cls.TEXT_ENCODERS for p in model.components[e].parameters())
    pipe = backbone_cls.pipeline_class().from_pretrained(path)
    assert type(pipe).__name__ == backbone_cls.PIPELINE
    stock = getattr(pipe, backbone_cls.DENOISER).state_dict()
    assert all(torch.equal(stock[k], v) for k, v in model.denoiser.state_dict().items())


def test_conditions_and_the_null_condition(family):
    _, _, path = family
    model = load_backbone(path)
    cond = model.encode_conditions(["the number 3", "the digit 4", "the number 3"])
    assert len(cond) == 3 and cond[0].equal(cond[2]) and not cond[0].equal(cond[1])
    null = model.null_condition(2)
    assert list(null.tensors) == list(cond.tensors) and len(null) == 2
    with torch.no_grad():
        x = model.initial_noise([1, 2]).to(model.device)
        t = model.draw_timesteps(2, torch.Generator().manual_seed(0))
        guided = model.guided_prediction(x, t, cond[:2], 3.0)
        p_c, p_u = model.predict(x, t, cond[:2]), model.predict(x, t, null)
    if getattr(model, "guidance_distilled", False):
        # FLUX: the guidance scale is an input of one forward; `predict` runs at the training guidance.
        with torch.no_grad():
            at_training = model.guided_prediction(x, t, cond[:2], model.training_guidance)
        torch.testing.assert_close(at_training, p_c, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(guided, p_c) and not torch.allclose(guided, p_u + 3.0 * (p_c - p_u), atol=1e-4)
    else:
        torch.testing.assert_close(guided, p_u + 3.0 * (p_c - p_u), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(p_c, p_u)


def _moved(path, by: float):
    """The model at `path` with every weight of its `condition` group moved by `by`, in memory."""
    model = load_backbone(path)
    with torch.no_grad():
        for p in model.trainable_parameters("condition").values():
            p.add_(by)
    return model


def test_save_and_load_give_identical_outputs(family, tmp_path):
    """A model changed in memory, saved and loaded back: the same weights, fingerprint, predictions and images."""
    _, backbone_cls, path = family
    model = _moved(path, 0.05)
    model.save_pretrained(tmp_path / "saved")
    again = load_backbone(tmp_path / "saved")
    assert type(again) is backbone_cls and again.fingerprint() == model.fingerprint() != load_backbone(path).fingerprint()
    prompts = ["the number 3", "the digit 7"]
    x, t = model.initial_noise([1, 2]), model.draw_timesteps(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.predict(x, t, model.encode_conditions(prompts)),
                           again.predict(x, t, again.encode_conditions(prompts)))
    images = [m.sample(prompts, [1, 2], steps=2, guidance=3.0, batch_size=2) for m in (model, again)]
    assert torch.equal(*images)


def test_image_depends_only_on_prompt_and_seed(family):
    _, _, path = family
    model = load_backbone(path)
    both = model.sample(["the number 3", "the number 5"], [10, 11], steps=2, guidance=3.0, batch_size=2)
    alone = model.sample(["the number 5"], [11], steps=2, guidance=3.0, batch_size=2)
    assert both.shape == (2, *model.image_shape) and torch.equal(both[1], alone[0])
    assert both.min() >= -1 and both.max() <= 1


def test_delta_applies_to_the_original_in_stock_diffusers(family, tmp_path):
    name, backbone_cls, path = family
    model = _moved(path, 0.1)
    model.save_delta(tmp_path / "delta.safetensors", model.trainable_parameters("condition"))
    prompts, seeds = ["the number 3", "the digit 7"], [1, 2]
    expected = model.sample(prompts, seeds, steps=2, guidance=3.0, batch_size=2)

    pipe = backbone_cls.pipeline_class().from_pretrained(path)  # the original weights, stock diffusers
    delta = load_file(tmp_path / "delta.safetensors")
    _, unexpected = getattr(pipe, backbone_cls.DENOISER).load_state_dict(delta, strict=False)
    assert not unexpected and set(delta) == set(model.trainable_parameters("condition"))
    assert torch.equal(backbone_cls(pipe).sample(prompts, seeds, steps=2, guidance=3.0, batch_size=2), expected)


def test_sd3_without_t5_saves_and_loads(tmp_path):
    """SD3 with its T5 dropped (as sd3-random builds it): the folder records the absence, loads back
    through the registry, and the condition keeps T5's sequence length with zeros in its place."""
    from tiny_pipelines import tiny_sd3_pipeline

    from erase.backbones import StableDiffusion3Backbone

    pipe = tiny_sd3_pipeline()
    with_t5 = StableDiffusion3Backbone(pipe).encode_conditions(["the number 3"]).tensors["encoder_hidden_states"]
    pipe.text_encoder_3 = pipe.tokenizer_3 = None
    StableDiffusion3Backbone(pipe).save_pretrained(tmp_path / "no-t5")
    model = load_backbone(tmp_path / "no-t5")
    assert type(model) is StableDiffusion3Backbone and model.components["text_encoder_3"] is None
    embeds = model.encode_conditions(["the number 3"]).tensors["encoder_hidden_states"]
    clip_tokens = model.components["tokenizer"].model_max_length
    assert embeds.shape == with_t5.shape and not embeds[:, clip_tokens:].any()
    assert model.sample(["the number 3"], [1], steps=2, guidance=3.0, batch_size=1).shape == (1, *model.image_shape)


def test_flux_guidance_maps_onto_the_pipeline_and_refuses_a_negative_prompt():
    """Guidance-distilled FLUX samples as stock FluxPipeline does at `guidance_scale`, and `denoise` (one
    forward per step at that embedded guidance) is the same computation; a negative prompt needs true
    guidance, which it does not run, and is refused."""
    from tiny_pipelines import tiny_flux_pipeline

    from erase.backbones import FluxBackbone
    from erase.utils import EraseError

    model = FluxBackbone(tiny_flux_pipeline())
    prompts = ["the number 3", "the digit 7"]
    latents = model.sample(prompts, [1, 2], steps=3, guidance=4.0, batch_size=2, return_latents=True)
    with torch.no_grad():
        assert torch.equal(latents, model.denoise(model.initial_noise([1, 2]), model.encode_conditions(prompts), 3, 4.0))
    assert not torch.equal(latents, model.sample(prompts, [1, 2], steps=3, guidance=1.0, batch_size=2,
                                                  return_latents=True))  # the guidance input changes the images
    with pytest.raises(EraseError, match="guidance-distilled"):
        model.sample(prompts, [1, 2], steps=2, guidance=4.0, batch_size=2, negative_prompt="a seven")


def test_flux_without_guidance_embedding_guides_with_two_forwards():
    """FLUX.1-schnell's layout (no guidance embedding): guidance is true classifier-free guidance against
    the empty prompt, in the contract and in the stock pipeline (`true_cfg_scale`) alike."""
    from tiny_pipelines import tiny_flux_pipeline

    from erase.backbones import FluxBackbone

    model = FluxBackbone(tiny_flux_pipeline(guidance_embeds=False))
    assert not model.guidance_distilled
    cond = model.encode_conditions(["the number 3", "the digit 4"])
    x, t = model.initial_noise([1, 2]), model.draw_timesteps(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        p_c, p_u = model.predict(x, t, cond), model.predict(x, t, model.null_condition(2))
        torch.testing.assert_close(model.guided_prediction(x, t, cond, 3.0), p_u + 3.0 * (p_c - p_u), atol=1e-5, rtol=1e-5)
        again = model.denoise(model.initial_noise([1, 2]), cond, 3, 3.0)
    latents = model.sample(["the number 3", "the digit 4"], [1, 2], steps=3, guidance=3.0, batch_size=2, return_latents=True)
    torch.testing.assert_close(latents, again, atol=1e-5, rtol=1e-5)


def test_a_single_flux_checkpoint_is_recognised_and_refused(tmp_path):
    """A FLUX.1 original transformer file (recognised by the tensor diffusers looks for) gets one line
    saying how to make a pipeline folder of it, not another backbone's error."""
    from safetensors.torch import save_file

    from erase.utils import EraseError

    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(2)}, str(tmp_path / "flux1-dev.safetensors"))
    with pytest.raises(EraseError, match="single FLUX transformer checkpoint.*FluxTransformer2DModel.from_single_file"):
        load_backbone(tmp_path / "flux1-dev.safetensors")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_joint_transformer_groups_split_where_the_text_enters(name):
    """SD3 and FLUX share one group layout: `condition` is where the text enters (the text stream's
    attention, the context and pooled-text embedders), `nocondition` the rest but the timestep (and
    FLUX's guidance) embedding and the output layers, which neither group trains."""
    backbone_cls, build = FAMILIES[name]
    names = [n for n, _ in build().transformer.named_parameters()]
    groups = {g: {n for n in names if keep(n)} for g, keep in backbone_cls.PARAMETER_GROUPS.items()}
    assert groups["all"] == set(names) and not groups["condition"] & groups["nocondition"]
    frozen = ("time_text_embed.timestep_embedder.", "norm_out.", "proj_out.")
    frozen += ("time_text_embed.guidance_embedder.",) if name == "flux" else ()
    assert set(names) - groups["condition"] - groups["nocondition"] == {n for n in names if n.startswith(frozen)}
    assert {n for n in names if n.startswith(("context_embedder.", "time_text_embed.text_embedder."))} <= groups["condition"]
    assert groups["text-kv"] and groups["text-kv"] <= groups["condition"] & groups["attn"]
    if name == "flux":  # the single-stream blocks share their weights between text and image tokens
        assert {n for n in names if n.startswith("single_transformer_blocks.")} <= groups["nocondition"]
