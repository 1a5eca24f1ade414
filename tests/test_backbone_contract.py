"""The backbone contract itself: conditions, prediction types, the registry (tiny models from configs)."""

from __future__ import annotations

import pytest
import torch

from erase.backbones import BACKBONES, Condition, StableDiffusionBackbone, load_backbone
from erase.methods.losses import denoise, noised
from erase.utils import EraseError
from test_sd_backbone import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def test_condition_rows_join_and_move():
    cond = Condition(encoder_hidden_states=torch.randn(3, 4, 2), time_ids=torch.arange(3.0)[:, None].repeat(1, 6))
    assert len(cond) == 3 and len(cond[1]) == 1 and len(cond[torch.tensor([0, 0, 2, 2])]) == 4
    assert cond[1:].equal(Condition.cat([cond[1], cond[2]]))
    half = cond.to("cpu", torch.float16)
    assert half.tensors["time_ids"].dtype == torch.float16
    assert Condition(class_labels=torch.tensor([1, 2])).to(dtype=torch.float16).tensors["class_labels"].dtype == torch.long
    with pytest.raises(EraseError, match="one row per sample"):
        Condition(a=torch.zeros(2), b=torch.zeros(3))
    with pytest.raises(EraseError, match="different kinds"):
        Condition.cat([cond, Condition(class_labels=torch.tensor([1]))])


def v_prediction_backbone() -> StableDiffusionBackbone:
    """A tiny SD 2.x-style pipeline whose UNet predicts v (as stabilityai/stable-diffusion-2 at 768 px)."""
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return StableDiffusionBackbone(pipe)


def test_v_prediction_loss_targets_v(tmp_path):
    model = v_prediction_backbone()
    assert model.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, *model.latent_shape, generator=g)
    b = noised(model, x0, model.encode_conditions(["the number 3"] * 4), g)
    # v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0 (Salimans & Ho), from the model's own schedule.
    abar = model.scheduler.alphas_cumprod[b.t].reshape(-1, 1, 1, 1)
    v = abar.sqrt() * b.noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(b.target, v)
    with torch.no_grad():
        pred = model.predict(b.x_t, b.t, b.cond).float()
        loss = denoise(model, b)
    torch.testing.assert_close(loss, ((pred - v) ** 2).mean())
    assert not torch.allclose(loss, ((pred - b.noise) ** 2).mean(), rtol=1e-3), "the loss must not target ε"
    # The saved pipeline still predicts v, and the backbone samples it as a v-prediction model.
    model.save_pretrained(tmp_path / "v")
    again = load_backbone(tmp_path / "v")
    assert again.prediction_type == "v_prediction"
    assert again.sampling_scheduler(4).config.prediction_type == "v_prediction"


def test_epsilon_model_targets_the_noise():
    model = StableDiffusionBackbone(tiny_pipeline())
    g = torch.Generator().manual_seed(0)
    b = noised(model, torch.randn(2, *model.latent_shape, generator=g), model.encode_conditions(["a"] * 2), g)
    assert model.prediction_type == "epsilon" and torch.equal(b.target, b.noise)


def test_every_backbone_has_the_semantic_groups():
    for backbone in BACKBONES.values():
        assert {"all", "condition", "nocondition"} <= set(backbone.PARAMETER_GROUPS), backbone.name
        assert all(target in backbone.PARAMETER_GROUPS for target in backbone.GROUP_ALIASES.values())


def test_unknown_model_lists_what_was_tried(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EraseError) as e:
        load_backbone(tmp_path / "empty")
    for name in BACKBONES:
        assert name in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as in CI: refused at once, without asking the Hub
    with pytest.raises(EraseError, match="nobody/nothing is not in the local Hugging Face cache"):
        load_backbone("nobody/nothing")


def test_flow_matching_interpolates_and_targets_the_velocity():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from erase.backbones import StableDiffusion3Backbone
    from tiny_pipelines import tiny_sd3_pipeline

    model = StableDiffusion3Backbone(tiny_sd3_pipeline())
    assert model.prediction_type == "flow"
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, *model.latent_shape, generator=g)
    b = noised(model, x0, model.encode_conditions(["the number 3"] * 6), g, antithetic=True)
    # Timesteps come from the shipped scheduler's shifted σ table (σ·1000), mirrored pairs when antithetic.
    table = FlowMatchEulerDiscreteScheduler.from_config(model.pipeline_scheduler.config).timesteps
    assert all(bool((table == t).any()) for t in b.t)
    sigma = (b.t / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(b.x_t, (1 - sigma) * x0 + sigma * b.noise)
    torch.testing.assert_close(b.target, b.noise - x0)
    with torch.no_grad():
        pred = model.predict(b.x_t, b.t, b.cond).float()
        torch.testing.assert_close(denoise(model, b), ((pred - (b.noise - x0)) ** 2).mean())


def test_flux_noises_and_samples_with_its_resolution_dependent_shift():
    """FLUX's scheduler shifts σ by the image's token count (`mu`): training draws from the T-point table
    shifted at the native resolution, the sampler walks the σ the stock pipeline sets at that
    resolution, and a larger image is shifted further."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from erase.backbones import FluxBackbone
    from tiny_pipelines import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    model = FluxBackbone(pipe)
    assert model.prediction_type == "flow" and model.pipeline_scheduler.config.use_dynamic_shifting
    config = model.pipeline_scheduler.config
    tokens = (model.sample_shape[1] // 2) * (model.sample_shape[2] // 2)
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    plain = FlowMatchEulerDiscreteScheduler.from_config(config).timesteps / 1000
    table = 1000 * FlowMatchEulerDiscreteScheduler.from_config(config).time_shift(mu, 1.0, plain)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, *model.latent_shape, generator=g)
    b = noised(model, x0, model.encode_conditions(["the number 3"] * 6), g, antithetic=True)
    assert all(bool(torch.isclose(table, t).any()) for t in b.t) and not all(bool((1000 * plain == t).any()) for t in b.t)
    sigma = (b.t / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(b.x_t, (1 - sigma) * x0 + sigma * b.noise)
    torch.testing.assert_close(b.target, b.noise - x0)

    def stock_sigmas(size: int) -> torch.Tensor:
        cond = model.encode_conditions(["the number 3"])
        pipe(prompt_embeds=cond.tensors["encoder_hidden_states"], pooled_prompt_embeds=cond.tensors["pooled_projections"],
             num_inference_steps=4, height=size, width=size, output_type="latent")
        return pipe.scheduler.sigmas.clone()

    torch.testing.assert_close(model.sampling_scheduler(4).sigmas, stock_sigmas(model.image_size))
    assert (stock_sigmas(2 * model.image_size)[1:-1] > model.sampling_scheduler(4).sigmas[1:-1]).all()
