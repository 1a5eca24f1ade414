"""Stable Diffusion 1.x weights in the original single-file (LDM) layout, for `erase export --format single-file`.

diffusers converts single files in this layout to its own (`diffusers.loaders.single_file_utils`:
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, which
`from_single_file` runs) but ships no function for the way back; only a script written for SD's four
UNet levels (scripts/convert_diffusers_to_original_stable_diffusion.py). `to_ldm_state_dict` is that
script's renaming, generalised to any number of levels. It is checked against diffusers' own
converters on every export (`check_round_trip`): a file is written only if diffusers reads every
tensor back to the weight it came from.
"""

from __future__ import annotations

import torch

from ..utils import EraseError

# A UNet or VAE resnet's layer names, diffusers -> LDM.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# The VAE's mid-block attention: LDM keeps its projections as 1x1 convolutions.
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _unet_prefixes(config) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is a resnet) for a UNet2DConditionModel of any depth."""
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
            pairs.append((f"up_blocks.{i}.upsamplers.0.",
                          f"output_blocks.{i * (per + 1) + per}.{2 if has_attention else 1}.", False))
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
        for diffusers_prefix, ldm_prefix, is_resnet in pairs:
            if key.startswith(diffusers_prefix):
                rest = key[len(diffusers_prefix):]
                if is_resnet:
                    head, _, tail = rest.partition(".")
                    rest = f"{resnet_map.get(head, head)}.{tail}"
                new = ldm_prefix + rest
                break
        out[prefix + new] = value.detach().cpu().contiguous()
    return out


def _vae_state(vae) -> dict[str, torch.Tensor]:
    """The VAE's state dict with its mid-block attention renamed and reshaped to LDM's 1x1 convolutions."""
    state = {}
    for key, value in vae.state_dict().items():
        for part in ("encoder", "decoder"):
            head = f"{part}.mid_block.attentions.0."
            if key.startswith(head):
                rest = key[len(head):]
                for ours, theirs in VAE_ATTENTION.items():
                    if rest.startswith(ours):
                        rest = theirs + rest[len(ours):]
                        if value.dim() == 2:
                            value = value[:, :, None, None]
                key = f"{part}.mid.attn_1.{rest}"
        state[key] = value
    return state


def to_ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The weights of an SD 1.x pipeline's three networks in the LDM single-file layout."""
    state = _rename(unet.state_dict(), _unet_prefixes(unet.config), UNET_RESNET, "model.diffusion_model.")
    state |= _rename(_vae_state(vae), _vae_prefixes(vae.config), VAE_RESNET, "first_stage_model.")
    # SD 1.x files hold a CLIPTextModel's weights under `text_model.`, which recent transformers
    # versions no longer put in its state dict keys.
    state |= {f"cond_stage_model.transformer.{'' if k.startswith('text_model.') else 'text_model.'}{k}":
              v.detach().cpu().contiguous() for k, v in text_encoder.state_dict().items()}
    return state


def check_round_trip(state: dict[str, torch.Tensor], unet, vae, text_encoder) -> None:
    """Convert `state` back with diffusers' own single-file converters; refuse unless every weight of
    the three networks comes back unchanged (an architecture the renaming does not cover)."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    checks = (("unet", unet, convert_ldm_unet_checkpoint(dict(state), unet.config)),
              ("vae", vae, convert_ldm_vae_checkpoint(dict(state), vae.config)),
              ("text_encoder", text_encoder, convert_ldm_clip_checkpoint(dict(state))))
    for name, module, converted in checks:
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        for key, value in module.state_dict().items():
            back = converted.get(key.removeprefix("text_model."))
            if back is None or back.shape != value.shape or not torch.equal(back.reshape(value.shape), value.cpu()):
                raise EraseError(f"the single-file layout does not cover this model: diffusers' converter does not "
                                 f"read {name}.{key} back unchanged; export it as a diffusers pipeline folder instead "
                                 "(the run folder itself)")
