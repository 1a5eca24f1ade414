"""`erase train-mini-flow`: a miniature Stable Diffusion 3 (flow matching) trained on captioned digits.

The flow-matching counterpart of `erase train-mini-sd` (erase/training/mini_sd.py, whose captions, tokenizer,
VAE recipe and accuracy check it reuses): a real `StableDiffusion3Pipeline` (AutoencoderKL with SD3's
latent shift and scale, two CLIPTextModelWithProjection encoders, no T5 (the pipeline puts zeros in
its place), SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler), only tiny: 16x16 digits, 4x8x8
latents in 2x2 patches. Phase 1 trains the VAE, phase 2 the transformer and both text encoders with
the SD3 backbone's own rectified-flow noising and velocity target, 10% of captions dropped to the
empty prompt for classifier-free guidance.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import config_dict, field
from ..data import DIGITS_NAMES
from ..utils import EraseError, logger, package_versions, step_generator
from .command import add_training_command
from .mini_sd import (HELDOUT_TEMPLATES, TRAIN_TEMPLATES, MiniTrainingConfig, _train_vae, build_tokenizer, build_vae,
                      caption_words, captions, check_and_save, draw_captioned_batch, training_digits, update_ema)
from .train_base import learning_rate


@dataclass
class MiniFlowConfig(MiniTrainingConfig):
    steps: int = field(3000, "transformer + text encoders training steps (phase 2; the shipped model's)")
    lr: float = field(1e-3, "peak AdamW learning rate of phase 2 (warm-up, cosine decay to 10%)")
    width: int = field(64, "transformer width (heads of 16)")
    layers: int = field(4, "joint transformer blocks")
    text_hidden: int = field(32, "width of each of the two CLIP text encoders")

    def __post_init__(self):
        super().__post_init__()
        if self.layers < 1 or self.width < 16 or self.width % 16:
            raise ValueError(f"layers must be at least 1 and width a positive multiple of 16, got {self.layers}, "
                             f"{self.width}")


def build_flow_pipeline(tokenizer, image_size: int = 16, vae_channels=(16, 32), width: int = 64, layers: int = 4,
                        text_hidden: int = 32):
    """A fresh, untrained StableDiffusion3Pipeline of the miniature architecture."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
            num_hidden_layers=2, num_attention_heads=2, projection_dim=text_hidden,
            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    latent = image_size // 2 ** (len(vae_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=width // 16, joint_attention_dim=2 * text_hidden, caption_projection_dim=width,
        pooled_projection_dim=2 * text_hidden, pos_embed_max_size=latent)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=build_vae(image_size, vae_channels, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)


def train_mini_flow(config: MiniFlowConfig, out: str | Path) -> dict:
    """Train the miniature SD3 on the digits train split and save it as a pipeline folder at `out`."""
    from ..backbones import Condition, StableDiffusion3Backbone

    start = time.perf_counter()
    data, excluded = training_digits(config)
    images = data.images.expand(-1, 3, -1, -1).contiguous()  # grey digits as RGB
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(caption_words())
    pipe = build_flow_pipeline(tokenizer, images.shape[-1], config.vae_channels, config.width, config.layers,
                               config.text_hidden)
    vae_loss = _train_vae(pipe.vae, images, config)
    with torch.no_grad():
        mean = pipe.vae.encode(images).latent_dist.mean
        # SD3's VAE config carries a shift and a scale that make the latents zero-mean and unit-variance.
        shift, scale = mean.mean().item(), 1.0 / mean.std().item()
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        latents = (mean - shift) * scale
    logger.info("vae trained (loss %.4f, shift %.4f, scale %.4f)", vae_loss, shift, scale)

    backbone = StableDiffusion3Backbone(pipe)  # its noising, timesteps and target; the modules are pipe's
    trained = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    emas = [copy.deepcopy(m).requires_grad_(False) for m in trained]
    for m in trained:
        m.train().requires_grad_(True)
    params = [p for m in trained for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    # Only the kept digits' captions are encoded (an excluded digit's name never reaches the text
    # encoders), so the labels are renumbered to positions among the kept digits.
    kept = [label for label in range(10) if label not in excluded]
    flat = [c for label in kept for c in captions(label)] + [""]
    position = torch.full((10,), -1, dtype=torch.long)
    position[kept] = torch.arange(len(kept))
    labels = position[data.labels]
    loss_avg = None
    for step in range(config.steps):
        g = step_generator(config.seed, 1, step)
        x0, caption, noise = draw_captioned_batch(latents, labels, config, g, len(kept))
        t = backbone.draw_timesteps(len(x0), g)
        # Every distinct caption through both text encoders once per step (81 short captions with no
        # digit excluded), with gradients.
        embeds, _, pooled, _ = pipe.encode_prompt(flat, None, None, device="cpu", do_classifier_free_guidance=False)
        cond = Condition(encoder_hidden_states=embeds, pooled_projections=pooled)[caption]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss = F.mse_loss(backbone.predict(backbone.add_noise(x0, noise, t), t, cond),
                          backbone.training_target(x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for ema, m in zip(emas, trained):
            update_ema(ema, m, config.ema_decay)
        value = loss.item()
        if not math.isfinite(value):
            raise EraseError(f"train-mini-flow: loss became {value} at step {step}; lower --lr (now {config.lr})")
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        if (step + 1) % 250 == 0:
            logger.info("flow step %d/%d: loss %.4f (%.0f s)", step + 1, config.steps, loss_avg,
                        time.perf_counter() - start)
    pipe.transformer, pipe.text_encoder, pipe.text_encoder_2 = (e.eval() for e in emas)
    train_time = time.perf_counter() - start

    backbone = StableDiffusion3Backbone(pipe)
    report = {"config": config_dict(config), "train_images": len(images), "excluded_digits": excluded,
              "vae_final_loss": vae_loss,
              "vae_shift_factor": shift, "vae_scaling_factor": scale, "final_loss": loss_avg,
              "train_time_s": round(train_time, 1), "class_words": list(DIGITS_NAMES),
              "train_templates": list(TRAIN_TEMPLATES),
              "heldout_templates": list(HELDOUT_TEMPLATES), "versions": package_versions()}
    return check_and_save(backbone, report, config, out, ("tokenizer", "tokenizer_2"), "train-mini-flow")


def add_commands(subparsers) -> None:
    add_training_command(subparsers, "train-mini-flow", MiniFlowConfig, run=lambda c, a: train_mini_flow(c, a.out),
                         out_help="pipeline folder to write (loads with StableDiffusion3Pipeline)")
