"""Single-file (original LDM layout) checkpoints: the test writes one from a tiny pipeline and loads it
back through `StableDiffusionPipeline.from_single_file`, offline, with the component configs of a
local pipeline folder."""

import pytest
import torch
from safetensors.torch import save_file

from erase.backbones import StableDiffusionBackbone, load_backbone
from erase.utils import EraseError
from test_sd_backbone import tiny_pipeline

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _unet_prefixes(config) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is a resnet) for a UNet2DConditionModel of any depth.

    The inverse of diffusers' `convert_ldm_unet_checkpoint`, generalised from its
    scripts/convert_diffusers_to_original_stable_diffusion.py (written for SD's 4 levels) to n levels.
    """
    n, per = len(config.block_out_channels), config.layers_per_block
    pairs = [("time_embedding.linear_1.", "time_embed.0.", False), ("time_embedding.linear_2.", "time_embed.2.", False),
             ("conv_in.", "input_blocks.0.0.", False), ("conv_norm_out.", "out.0.", False), ("conv_out.", "out.2.", False),
             ("mid_block.attentions.0.", "middle_block.1.", False)]
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True) for j in range(2)]
    for i in range(n):
        for j in range(per):
            block = 1 + i * (per + 1) + j
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", True),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", False)]
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op.", False))
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(per + 1):
            block = i * (per + 1) + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", True),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", False)]
        if i < n - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (per + 1) + per}.{2 if has_attention else 1}.", False))
    return pairs


def _vae_prefixes(config) -> list[tuple[str, str, bool]]:
    n = len(config.block_out_channels)
    pairs = [(f"{part}.conv_norm_out.", f"{part}.norm_out.", False) for part in ("encoder", "decoder")]
    pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", True)
              for part in ("encoder", "decoder") for j in range(2)]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", True) for j in range(2)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", True) for j in range(3)]
        pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", False),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", False)]
    return pairs


def _rename(state: dict, pairs, resnet_map: dict, prefix: str) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        for diffusers, ldm, is_resnet in pairs:
            if key.startswith(diffusers):
                rest = key[len(diffusers):]
                if is_resnet:
                    head, _, tail = rest.partition(".")
                    rest = f"{resnet_map.get(head, head)}.{tail}"
                new = ldm + rest
                break
        out[prefix + new] = value.contiguous()
    return out


def to_ldm_state_dict(pipe) -> dict:
    """A pipeline's weights in the original LDM single-file layout (SD 1.x key names)."""
    state = _rename(pipe.unet.state_dict(), _unet_prefixes(pipe.unet.config), RESNET, "model.diffusion_model.")
    state |= _rename(pipe.vae.state_dict(), _vae_prefixes(pipe.vae.config), {"conv_shortcut": "nin_shortcut"},
                     "first_stage_model.")
    # SD 1.x files hold a CLIPTextModel's weights under `text_model.`, which transformers >= 5.6 no
    # longer has in its state dict keys.
    state |= {f"cond_stage_model.transformer.{'' if k.startswith('text_model.') else 'text_model.'}{k}": v.contiguous()
              for k, v in pipe.text_encoder.state_dict().items()}
    return state


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    pipe = tiny_pipeline(seed=3)
    # The configs of a same-architecture pipeline folder, as a user would pass with `config=`.
    StableDiffusionBackbone(tiny_pipeline(seed=4)).save_pretrained(root / "configs")
    save_file(to_ldm_state_dict(pipe), str(root / "model.safetensors"))
    return root, pipe


def test_single_file_loads_offline_with_local_configs(single_file):
    root, pipe = single_file
    model = load_backbone(root / "model.safetensors", config=root / "configs")
    assert isinstance(model, StableDiffusionBackbone)
    for name, module in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
        loaded = getattr(model, name).state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(loaded[key], value), f"{name}.{key}"
    expected = StableDiffusionBackbone(pipe).sample(["the number 3"], [5], steps=3, batch_size=1)
    assert torch.equal(model.sample(["the number 3"], [5], steps=3, batch_size=1), expected)


def test_single_file_errors(single_file, tmp_path):
    root, _ = single_file
    with pytest.raises(EraseError, match="not a diffusers pipeline folder"):
        load_backbone(root / "model.safetensors", config=tmp_path)
    # An LDM checkpoint of another architecture than the config folder: the shapes do not fit.
    from erase.mini_sd import build_pipeline, build_tokenizer, caption_words
    bigger = build_pipeline(build_tokenizer(caption_words()), vae_channels=(8, 16), unet_channels=(16, 32),
                            text_hidden=16)
    save_file(to_ldm_state_dict(bigger), str(tmp_path / "bigger.safetensors"))
    with pytest.raises(EraseError, match="could not load a StableDiffusionPipeline"):
        load_backbone(tmp_path / "bigger.safetensors", config=root / "configs")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EraseError, match="is a file but not a checkpoint"):
        load_backbone(tmp_path / "notes.txt")
