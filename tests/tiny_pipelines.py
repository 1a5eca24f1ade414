"""Tiny random pipelines of the SDXL, SD3 and FLUX (flow-matching) families, built from configs (a few seconds on a CPU).

Same component classes and wiring as the real models, tiny widths: what the backbone code sees is
the real thing, the images are noise. The tokenizers are the mini-SD's word tokenizer.
"""

from __future__ import annotations

import torch


def _tokenizer():
    from erase.training.mini_sd import build_tokenizer, caption_words

    return build_tokenizer(caption_words())


def _clip(tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, projection_dim=projection or hidden,
                            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16, **extra)


def tiny_sdxl_pipeline(seed: int = 0):
    """StableDiffusionXLPipeline: UNet (8, 16) with SDXL's text_time added embedding, CLIP widths 8 + 8."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 4 + 8,
        cross_attention_dim=16, norm_num_groups=4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_vae(4, scaling_factor=0.13025), text_encoder=_clip(tokenizer, 8),
                                     text_encoder_2=_clip(tokenizer, 8, projection=8), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)


def _t5(width: int, max_length: int = 16):
    """A one-layer T5 encoder and a T5 tokenizer over the caption words (a Unigram vocabulary; saved
    and read back so that it is the tokenizer a stock load of the pipeline folder builds)."""
    import tempfile

    from tokenizers import Tokenizer, models
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    from erase.training.mini_sd import caption_words

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in sorted(set(caption_words()))]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    made = T5TokenizerFast(tokenizer_object=Tokenizer(models.Unigram(pieces, unk_id=2)), eos_token="</s>",
                           pad_token="<pad>", unk_token="<unk>", extra_ids=0, model_max_length=max_length)
    with tempfile.TemporaryDirectory() as tmp:
        made.save_pretrained(tmp)
        tokenizer = T5TokenizerFast.from_pretrained(tmp)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=4, d_ff=2 * width, num_layers=1,
                                      num_heads=2, pad_token_id=0, eos_token_id=1))
    return encoder, tokenizer


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True):
    """StableDiffusion3Pipeline: a 2-layer SD3Transformer2DModel (patch 2, width 8) on two CLIPs and a
    one-layer T5 (or none, as models/mini-flow), with a VAE using SD3's latent shift and scale."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    t5_encoder, t5_tokenizer = _t5(16) if t5 else (None, None)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=4, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=8, pooled_projection_dim=16, pos_embed_max_size=8)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, 8, projection=8), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, 8, projection=8), tokenizer_2=tokenizer, text_encoder_3=t5_encoder, tokenizer_3=t5_tokenizer)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """FluxPipeline: a FluxTransformer2DModel with one double-stream and one single-stream block (width
    16, 2x2 patches of 4-channel latents) and a guidance embedding as FLUX.1-dev (without one: as
    FLUX.1-schnell), on a CLIP (pooled text) and a one-layer T5 (the sequence, 512 tokens), with FLUX's VAE latent
    shift and scale and FLUX.1-dev's resolution-dependent scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    t5_encoder, t5_tokenizer = _t5(16, max_length=512)  # FLUX.1-dev's T5 length, the stock pipeline's default
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_vae(4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, 8), tokenizer=tokenizer, text_encoder_2=t5_encoder, tokenizer_2=t5_tokenizer)


def _families() -> dict:
    from erase.backbones import FluxBackbone, StableDiffusion3Backbone, StableDiffusionXLBackbone

    return {"sdxl": (StableDiffusionXLBackbone, tiny_sdxl_pipeline), "sd3": (StableDiffusion3Backbone, tiny_sd3_pipeline),
            "flux": (FluxBackbone, tiny_flux_pipeline)}


#: family name -> (backbone class, tiny pipeline builder)
FAMILIES = _families()
