"""Full-size architectures with random weights for `erase bench --model sdxl-random / sd3-random`.

Costs (step time, memory) are those of the real models at their native 1024 px; the images are
noise. Component shapes follow the published configs of stabilityai/stable-diffusion-xl-base-1.0 and
stabilityai/stable-diffusion-3-medium-diffusers. The tokenizers are the mini-SD's word tokenizer
padded to CLIP's 77 positions (only the sequence length matters for cost). SD3 is built without its
T5-XXL encoder (the pipeline puts zeros of T5's width and length in its place, as diffusers documents
for memory): the transformer sees the same 333-token text sequence, and prompts are encoded once and
cached, so the encoder's absence leaves the per-step cost unchanged.
"""

from __future__ import annotations

import torch


def _tokenizer():
    from ..training.mini_sd import build_tokenizer, caption_words

    return build_tokenizer(caption_words(), max_length=77)


def _clip(tokenizer, hidden: int, layers: int, heads: int, projection: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                            projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(resolution: int, latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=resolution, **extra)


def sdxl_random_pipeline(resolution: int = 1024):
    """SDXL base 1.0's architecture: UNet 2.6B parameters, CLIP ViT-L + OpenCLIP bigG text encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_vae(resolution, 4, scaling_factor=0.13025, force_upcast=True),
        text_encoder=_clip(tokenizer, 768, 12, 12), text_encoder_2=_clip(tokenizer, 1280, 32, 20, 1280, act="gelu"),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)


def sd3_random_pipeline(resolution: int = 1024):
    """SD3 medium's architecture: SD3Transformer2DModel 2B parameters (24 joint blocks), CLIP-L + CLIP-G."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=192)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(resolution, 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                 use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, 768, 12, 12, 768), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, 1280, 32, 20, 1280, act="gelu"), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
