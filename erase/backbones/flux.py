"""FLUX.1: a guidance-distilled flow-matching transformer (`FluxTransformer2DModel`) on CLIP-L and T5.

**Guidance is an input, not two forwards.** FLUX.1-dev was distilled from a model sampled with
classifier-free guidance: the guidance scale enters the transformer as an embedding beside the
timestep (`guidance_embeds` in its config), and one conditional forward at guidance `s` stands for
the two-forward combination `v(∅) + s·(v(c) − v(∅))` of the teacher. The contract's calls map onto
that as follows:

- `guided_prediction(x_t, t, cond, s)` is ONE forward with the guidance embedding set to `s`, and
  sampling (`sample`, `denoise`, `partial_sample`, `sampling_path`) passes `s` as the stock
  pipeline's `guidance_scale`. Inversion (`invert`) walks back `denoise(..., guidance=1)`.
- `predict(x_t, t, cond)`, the single prediction every loss is written with, runs at a fixed
  *training guidance*: the model's sampling guidance (`sample_defaults["guidance"]`, 3.5 for
  FLUX.1-dev as diffusers' `FluxPipeline` samples it, or what a model records in its
  `info.sample_defaults`). The model is trained where it will be used.
- The **null condition** is the empty prompt's encoding (T5 sequence and CLIP pooled vector of
  ""), predicted at that same training guidance. Methods that steer away from a condition (ESD's
  `v(∅) − η(v(c) − v(∅))`, anchors, the retain terms) combine such predictions linearly. This is
  what EraseAnything's ESD loss on FLUX.1-dev does (the empty prompt as the neutral condition,
  every prediction at one fixed embedded guidance, 3 in its code); it is our choice for every
  method here.
- A FLUX transformer *without* a guidance embedding (FLUX.1-schnell's layout) has no embedded
  guidance: there `guided_prediction` is true classifier-free guidance (two forwards against the
  empty prompt) and sampling passes the pipeline's `true_cfg_scale`, so the contract means the same.

A negative prompt (`sample(..., negative_prompt=...)`) needs true guidance, which a guidance-
distilled model does not run: it is refused with one line.

**Condition.** `Condition(encoder_hidden_states=T5 sequence, pooled_projections=CLIP pooled)`, as
`FluxPipeline.encode_prompt` makes them, with T5 read up to its tokenizer's length (at most 512, the
pipeline's limit). The text position ids are zeros (as the pipeline makes them) and are built in
`_forward`, not stored.

**Loading.** A `FluxPipeline` folder (or a Hub id in the local cache), saved back as one that stock
diffusers loads; a single original checkpoint file is recognised and refused with one line that
says how to make a pipeline folder of it (the released files hold the transformer alone).

**Latents.** Samples are the VAE latents (C, H, W), shifted and scaled as the pipeline does, so the
methods, data sets and attacks see the same shapes as on every other backbone. The transformer reads
them packed into 2x2 patches (a sequence of H/2·W/2 tokens of 4C channels) with image position ids;
`_forward` packs, runs and unpacks with the pipeline's own helpers. The native resolution is the
VAE config's `sample_size` (1024 px for FLUX.1).

**Schedule.** Rectified flow (`FlowMatchingSchedule`): `x_t = (1 − σ)·x0 + σ·ε`, target `ε − x0`.
FLUX's scheduler shifts σ by the image's token count (`use_dynamic_shifting`, `mu` from
`calculate_shift`, as the pipeline computes it). Sampling uses the pipeline's σ grid and `mu` at the
resolution drawn; training draws σ from the scheduler's T-point table shifted with `mu` at the
native resolution, so training sees the σ the sampler walks through at that resolution.

**Parameter groups** mirror SD3's names: `condition` is the double-stream blocks' text-side
attention projections, the T5 context embedder and the pooled-text embedder; `nocondition` is the
rest without the timestep and guidance embedders and the output layers (the single-stream blocks
are all in it: text and image tokens share their weights); `attn` every attention; `text-kv` the
text keys and values of the double-stream blocks.

**Attacks.** The token attacks (concept inversion, prefix) edit CLIP's input token embeddings, but
FLUX reads the prompt's sequence from T5 alone (CLIP gives one pooled vector): building a condition
from token embeddings is refused with one line, as on SD3 with T5. The condition override (robust
erasure), the embedding attack (Ring-A-Bell: T5 sequence and pooled vector) and the latent attack
(null-latent, through `invert` and `denoise`) run on FLUX.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..utils import EraseError
from .base import Condition, FlowMatchingSchedule, uniform_indices
from .pipeline import TextToImageBackbone, joint_transformer_groups

#: the T5 length FluxPipeline reads at most
MAX_T5_LENGTH = 512
#: a tensor of every FLUX.1 original checkpoint (bare, or under ComfyUI's prefix), as diffusers detects one
SINGLE_FILE_KEYS = frozenset({"double_blocks.0.img_attn.norm.key_norm.scale",
                              "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"})


# The guidance embedder is frozen with the timestep embedder beside it; `attn` is the joint attention
# of both block kinds (the single-stream blocks' `attn` too).
FLUX_GROUPS = joint_transformer_groups(
    time_or_output=("time_text_embed.timestep_embedder.", "time_text_embed.guidance_embedder.", "norm_out.",
                    "proj_out."),
    attention=(".attn.",))


class FluxBackbone(FlowMatchingSchedule, TextToImageBackbone):
    """VAE + CLIP-L (pooled) + T5 (sequence) + FluxTransformer2DModel + shifted flow-matching schedule."""

    name = "flux"
    PIPELINE = "FluxPipeline"
    PIPELINE_NAMES = ("FluxPipeline",)
    DENOISER = "transformer"
    delta_module = "transformer"
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
    CLIP_ENCODERS = (("text_encoder", "tokenizer"),)
    PARAMETER_GROUPS = FLUX_GROUPS
    EXPORT_FORMATS = ("diffusers-lora",)
    SAMPLE_DEFAULTS = {"steps": 28, "guidance": 3.5, "eta": 0.0}  # FluxPipeline's defaults (FLUX.1-dev)
    accepts_description = "a FluxPipeline folder or Hub id (a single FLUX checkpoint file is recognised and refused)"

    @classmethod
    def accepts(cls, source) -> bool:
        if source.kind == "file":  # recognised by the tensor diffusers' own single-file loader looks for
            return bool(SINGLE_FILE_KEYS & source.keys)
        return source.pipeline_class in cls.PIPELINE_NAMES

    @classmethod
    def from_source(cls, source, **kwargs) -> "FluxBackbone":
        if source.kind == "file":
            # The released FLUX.1 files hold the transformer alone, and diffusers converts only the
            # full-size layout, so there is nothing here that a pipeline folder does not do better.
            raise EraseError(f"{source.text} is a single FLUX transformer checkpoint, which this package does not load: "
                             "load it with diffusers' FluxTransformer2DModel.from_single_file into a FluxPipeline, "
                             "save_pretrained that pipeline and pass its folder")
        return super().from_source(source, **kwargs)

    def _check(self, pipe) -> None:
        from diffusers import FluxTransformer2DModel

        transformer = getattr(pipe, "transformer", None)
        if not isinstance(transformer, FluxTransformer2DModel):
            raise EraseError(f"{type(pipe).__name__} has no FluxTransformer2DModel: not a FLUX pipeline")
        if pipe.text_encoder is None or pipe.text_encoder_2 is None:
            raise EraseError("a FLUX pipeline needs both text encoders: CLIP gives the pooled text and T5 the "
                             "sequence the transformer attends to")
        if transformer.config.pooled_projection_dim != pipe.text_encoder.config.hidden_size:
            raise EraseError(f"the transformer takes {transformer.config.pooled_projection_dim}-dim pooled text but "
                             f"CLIP makes {pipe.text_encoder.config.hidden_size}: the components do not belong together")
        if transformer.config.joint_attention_dim != pipe.text_encoder_2.config.d_model:
            raise EraseError(f"the transformer attends to {transformer.config.joint_attention_dim}-dim text but T5 "
                             f"makes {pipe.text_encoder_2.config.d_model}: the components do not belong together")

    def _training_scheduler(self, shipped):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(shipped.config)

    # -- guidance -----------------------------------------------------------------------------------
    @property
    def guidance_distilled(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (FLUX.1-dev) or not (schnell)."""
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def training_guidance(self) -> float:
        """The embedded guidance of `predict`: the model's sampling guidance (module docstring)."""
        return float(self.sample_defaults["guidance"])

    def guided_prediction(self, x_t, t, cond, guidance, denoiser=None):
        """One forward at embedded guidance `guidance` (true two-forward guidance without a guidance embedding)."""
        if not self.guidance_distilled:
            return super().guided_prediction(x_t, t, cond, guidance, denoiser)
        t = t.expand(len(x_t)) if t.dim() == 0 else t
        return self._forward(denoiser or self.denoiser, x_t, t, cond, guidance=guidance)

    # -- conditions ---------------------------------------------------------------------------------
    @property
    def _t5_length(self) -> int:
        return min(MAX_T5_LENGTH, self.components["tokenizer_2"].model_max_length)

    def _encode_prompts(self, prompts: list[str]) -> Condition:
        device = self.components["text_encoder"].device
        embeds, pooled, _ = self.pipeline().encode_prompt(prompts, None, device=device, num_images_per_prompt=1,
                                                          max_sequence_length=self._t5_length)
        return Condition(encoder_hidden_states=embeds, pooled_projections=pooled)

    # -- closed-form edits ----------------------------------------------------------------------------
    def text_entry_layers(self) -> dict:
        # The text stream's entry (where OCE edits FLUX): every T5 row goes through it before any block.
        return {"context_embedder": self.denoiser.context_embedder}

    def text_entries(self) -> dict:
        # The pooled CLIP vector enters as on SD3 (`time_text_embed.text_embedder`).
        return {**super().text_entries(), "pooled": self.pooled_text_entry()}

    def _text_segments(self) -> list[tuple[str, int | None]]:
        return [("tokenizer_2", self._t5_length)]  # the T5 sequence only; the pooled CLIP text enters elsewhere

    # -- latents, schedule and the forward ----------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.vae.config.sample_size

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.image_size // self.vae_scale_factor
        return (self.denoiser.config.in_channels // 4, size, size)

    def _mu(self, height: int, width: int) -> float:
        """The scheduler's resolution-dependent shift for latents of (height, width), as FluxPipeline computes it."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler.config
        return calculate_shift((height // 2) * (width // 2), config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.15))

    def sampling_scheduler(self, steps: int):
        """The pipeline's sampler at the native resolution: σ from 1 to 1/steps, shifted with its `mu`."""
        sampler = type(self.scheduler).from_config(self.scheduler.config)
        _, height, width = self.sample_shape
        sampler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=self._mu(height, width))
        return sampler

    @functools.cached_property
    def _training_timesteps(self) -> torch.Tensor:
        """The scheduler's T-point σ table (σ = 1 first) shifted as at the native resolution, times T."""
        fresh = type(self.scheduler).from_config(self.scheduler.config)
        sigmas = fresh.timesteps / self.num_train_timesteps
        if self.scheduler.config.use_dynamic_shifting:
            sigmas = fresh.time_shift(self._mu(*self.sample_shape[1:]), 1.0, sigmas)
        return (sigmas * self.num_train_timesteps).float()

    def draw_timesteps(self, n: int, g: torch.Generator, antithetic: bool = False) -> torch.Tensor:
        return self._training_timesteps[uniform_indices(self.num_train_timesteps, n, g, antithetic)]

    def _forward(self, denoiser, x_t, t, cond, guidance: float | None = None):
        from diffusers import FluxPipeline

        n, channels, height, width = x_t.shape
        if height % 2 or width % 2:
            raise EraseError(f"FLUX packs latents into 2x2 patches: their height and width must be even, "
                             f"got {height}x{width}")
        c = cond.tensors
        text = c["encoder_hidden_states"]
        embedded = None
        if self.guidance_distilled:
            embedded = torch.full((n,), self.training_guidance if guidance is None else guidance,
                                  device=x_t.device, dtype=torch.float32)
        out = denoiser(hidden_states=FluxPipeline._pack_latents(x_t, n, channels, height, width),
                       timestep=t.to(x_t.dtype) / self.num_train_timesteps, guidance=embedded,
                       pooled_projections=c["pooled_projections"], encoder_hidden_states=text,
                       txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=text.dtype),
                       img_ids=FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, x_t.device, x_t.dtype),
                       return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, height, width, 1)

    # -- sampling through the stock pipeline --------------------------------------------------------
    def _sample_batch(self, prompts, seeds, steps, guidance, eta, raw_seeds, negative_prompt: str = "", **options):
        if negative_prompt and self.guidance_distilled:
            raise EraseError("this FLUX model is guidance-distilled (guidance is an input of one forward), so it "
                             "has no second forward for a negative prompt to steer: sample without one")
        f = 2 * self.vae_scale_factor
        height, width = options.get("height") or self.image_size, options.get("width") or self.image_size
        if height % f or width % f:
            raise EraseError(f"height and width must be multiples of {f} for this FLUX model, got {height}x{width}")
        return super()._sample_batch(prompts, seeds, steps, guidance, eta, raw_seeds,
                                     negative_prompt=negative_prompt, **options)

    def _pipeline_inputs(self, cond, negative):
        inputs = {"prompt_embeds": cond.tensors["encoder_hidden_states"],
                  "pooled_prompt_embeds": cond.tensors["pooled_projections"]}
        if not self.guidance_distilled:  # true guidance against the negative (the empty prompt by default)
            inputs.update(negative_prompt_embeds=negative.tensors["encoder_hidden_states"],
                          negative_pooled_prompt_embeds=negative.tensors["pooled_projections"])
        return inputs

    def _guidance_inputs(self, guidance: float) -> dict:
        return {"guidance_scale": guidance} if self.guidance_distilled else {"true_cfg_scale": guidance}

    def _to_pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        n, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, n, channels, height, width)

    def _from_pipeline_latents(self, latents: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, shape[1], shape[2], 1)

    # -- attack hooks -------------------------------------------------------------------------------
    def _condition_from_text_encoders(self, outputs, n: int) -> Condition:
        raise EraseError("the token attacks edit CLIP's token embeddings, but FLUX reads the prompt's sequence "
                         "from T5 alone (CLIP gives one pooled vector): use attack-ring-a-bell or "
                         "attack-null-latent on FLUX")
