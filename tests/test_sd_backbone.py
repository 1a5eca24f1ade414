"""The Stable Diffusion backbone on a tiny pipeline built from configs (no downloads)."""

import json

import pytest
import torch

from erase.backbones import ClassConditionalDDPM, StableDiffusionBackbone, load_backbone
from erase.training.mini_sd import build_pipeline, build_tokenizer, caption_words
from erase.utils import EraseError


def tiny_pipeline(seed: int = 0):
    """UNet (8, 16), CLIP hidden 16, VAE (8, 16): a few hundred thousand weights, random."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(caption_words())
    return build_pipeline(tokenizer, vae_channels=(8, 16), unet_channels=(8, 16), text_hidden=16)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny"
    StableDiffusionBackbone(tiny_pipeline()).save_pretrained(path)
    return path


def test_load_backbone_dispatches_pipeline_folders(tiny_folder):
    model = load_backbone(tiny_folder)
    assert isinstance(model, StableDiffusionBackbone)
    assert model.info["source"] == str(tiny_folder)
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert type(model.unet.attn_processors[next(iter(model.unet.attn_processors))]).__name__ == "AttnProcessor2_0"


def test_conditions_are_cached_text_embeddings(tiny_folder):
    model = load_backbone(tiny_folder)
    cond = model.encode_conditions(["the number 3", "", "the number 3"])
    assert cond.tensors["encoder_hidden_states"].shape == (3, model.tokenizer.model_max_length, 16)
    assert cond[0].equal(cond[2])
    assert model.null_condition(2)[0].equal(cond[1])
    assert set(model._embeddings) == {"the number 3", ""}
    with pytest.raises(EraseError, match="list of prompts"):
        model.encode_conditions("the number 3")


@pytest.mark.parametrize("group", ["all", "xattn", "noxattn", "xattn-kv"])
def test_only_the_chosen_group_moves(tiny_folder, group):
    model = load_backbone(tiny_folder)
    chosen = model.trainable_parameters(group)
    model.unet.requires_grad_(False)
    for p in chosen.values():
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    optimizer = torch.optim.SGD(chosen.values(), lr=1.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, *model.latent_shape, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(model.num_train_timesteps, (4,), generator=g)
    cond = model.encode_conditions(["the number 3"] * 4)
    loss = ((model.predict(model.add_noise(x0, noise, t), t, cond) - noise) ** 2).mean()
    loss.backward()
    optimizer.step()
    moved = {n for n, p in model.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(chosen)
    assert len(moved) >= 0.5 * len(chosen)  # not only a lucky few: gradients reach the group
    if group == "xattn":
        assert all(".attn2." in n for n in chosen)
    if group == "noxattn":
        assert not any(".attn2." in n or n.startswith(("time_embedding.", "conv_out.")) for n in chosen)


def test_delta_round_trips_through_stock_diffusers(tiny_folder, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    model = load_backbone(tiny_folder)
    with torch.no_grad():
        for p in model.trainable_parameters("xattn-kv").values():
            p.add_(0.5)
    model.save_delta(tmp_path / "delta.safetensors", model.trainable_parameters("xattn-kv"))
    expected = model.sample(["the number 3", "a drawing of a 7"], [1, 2], steps=4, guidance=3.0, batch_size=2)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)  # the original weights
    delta = load_file(tmp_path / "delta.safetensors")
    missing, unexpected = pipe.unet.load_state_dict(delta, strict=False)
    assert not unexpected and len(delta) == len(model.trainable_parameters("xattn-kv"))
    reloaded = StableDiffusionBackbone(pipe).sample(["the number 3", "a drawing of a 7"], [1, 2], steps=4,
                                                    guidance=3.0, batch_size=2)
    assert torch.equal(expected, reloaded)


def test_samples_depend_only_on_prompt_and_seed(tiny_folder):
    model = load_backbone(tiny_folder)
    both = model.sample(["the number 3", "the number 5"], [10, 11], steps=3, batch_size=4)
    alone = model.sample(["the number 5"], [11], steps=3, batch_size=4)
    assert both.shape == (2, 3, 16, 16) and both.min() >= -1 and both.max() <= 1
    assert torch.equal(both[1], alone[0])
    latents = model.sample(["the number 5"], [11], steps=3, batch_size=4, return_latents=True)
    assert latents.shape == (1, *model.latent_shape)


def test_save_pretrained_round_trip(tiny_folder, tmp_path):
    model = load_backbone(tiny_folder)
    with torch.no_grad():
        next(iter(model.unet.parameters())).add_(1.0)
    model.save_pretrained(tmp_path / "out", note="changed")
    again = load_backbone(tmp_path / "out")
    assert again.info["note"] == "changed"
    for (n, a), b in zip(model.unet.state_dict().items(), again.unet.state_dict().values()):
        assert torch.equal(a, b), n
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["scheduler"][1] == "DDIMScheduler" and index["safety_checker"] == [None, None]


def test_unknown_or_missing_parameter_groups(tiny_folder):
    from diffusers import UNet2DConditionModel

    model = load_backbone(tiny_folder)
    with pytest.raises(EraseError, match="does not exist.*xattn"):
        model.trainable_parameters("class-emb")
    # A UNet without any cross-attention layer has an empty `xattn` group: refused, not ignored.
    pipe = tiny_pipeline()
    pipe.unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
        mid_block_type=None, cross_attention_dim=16)
    with pytest.raises(EraseError, match="empty"):
        StableDiffusionBackbone(pipe).trainable_parameters("xattn")


def test_wrong_architecture_is_a_clear_error(tmp_path, tiny_folder):
    # A class-conditional DDPM's UNet weights are a .safetensors file, but not an SD checkpoint.
    ddpm = ClassConditionalDDPM.create([str(i) for i in range(3)], image_size=8, channels=1,
                                       block_out_channels=(8, 16), attention_levels=(False, False))
    ddpm.save_pretrained(tmp_path / "ddpm")
    weights = tmp_path / "ddpm" / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(EraseError, match="not a model any backbone loads: it is a file"):
        load_backbone(weights)
    # A pipeline folder whose text encoder does not fit the UNet (cross-attention 16 vs 32).
    other = tmp_path / "mismatch"
    StableDiffusionBackbone(tiny_pipeline()).save_pretrained(other)
    big_text = build_pipeline(build_tokenizer(caption_words()), vae_channels=(8, 16), unet_channels=(8, 16),
                              text_hidden=32).text_encoder
    big_text.save_pretrained(other / "text_encoder")
    with pytest.raises(EraseError, match="could not load|do not belong together"):
        load_backbone(other)
    with pytest.raises(EraseError, match="not a model"):
        load_backbone(tmp_path)  # an existing folder that is neither kind
    with pytest.raises(EraseError, match="does not exist"):
        load_backbone(tmp_path / "nothing-here")
