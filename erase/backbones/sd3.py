"""Stable Diffusion 3: a flow-matching transformer (`SD3Transformer2DModel`, MMDiT) on three text encoders.

SD3 is trained with classifier-free guidance, so it has a real unconditional prediction
`v(x_t, t, ∅)`, which every method here is built on (ESD's negative guidance
`v_0(∅) − η(v_0(c) − v_0(∅))`, the anchors and null conditions of the others, guided sampling).
FLUX.1-dev, the other flow-matching family (`flux.py`), is guidance-distilled: the guidance scale is
an input of one conditional forward, and `flux.py` says how the contract maps onto that. SD3's
pipeline also runs without its T5 encoder (zeros in its place, as diffusers documents for memory),
and tiny SD3 configs, T5 included, build on a CPU in seconds.

Training is rectified flow (`FlowMatchingSchedule`): `x_t = (1 − σ)·x0 + σ·ε`, target `ε − x0`,
with σ drawn from the shipped scheduler's shifted table. The condition is the joint text sequence
(both CLIP encoders' penultimate states, zero-padded to the T5 width, followed by T5's states:
`encoder_hidden_states`) plus the two CLIP pooled projections (`pooled_projections`). It enters the
transformer through the text stream's attention projections and the context embedder, and through
the pooled-text embedder beside the timestep embedding: that is the `condition` group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import EraseError
from .base import Condition, FlowMatchingSchedule
from .pipeline import TextToImageBackbone, joint_transformer_groups

# The timestep embedding and output layers stay out of `nocondition`; `attn` takes both attention
# streams (the joint `attn` and SD3.5's image-only `attn2`).
TRANSFORMER_GROUPS = joint_transformer_groups(
    time_or_output=("time_text_embed.timestep_embedder.", "norm_out.", "proj_out."),
    attention=(".attn.", ".attn2."))


class StableDiffusion3Backbone(FlowMatchingSchedule, TextToImageBackbone):
    """VAE + CLIP-L + CLIP-G (+ optional T5) + SD3Transformer2DModel + flow-matching schedule."""

    name = "stable-diffusion-3"
    PIPELINE = "StableDiffusion3Pipeline"
    PIPELINE_NAMES = ("StableDiffusion3Pipeline",)
    DENOISER = "transformer"
    delta_module = "transformer"
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
    CLIP_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    SINGLE_FILE_PREFIXES = ("model.diffusion_model.joint_blocks.",)
    PARAMETER_GROUPS = TRANSFORMER_GROUPS
    EXPORT_FORMATS = ("diffusers-lora",)
    SAMPLE_DEFAULTS = {"steps": 28, "guidance": 7.0, "eta": 0.0}  # SD3's model card
    accepts_description = ("a StableDiffusion3Pipeline folder or Hub id, or a single SD3 checkpoint "
                           "(model.diffusion_model.joint_blocks.* weights)")

    def _check(self, pipe) -> None:
        from diffusers import SD3Transformer2DModel

        transformer = getattr(pipe, "transformer", None)
        if not isinstance(transformer, SD3Transformer2DModel):
            raise EraseError(f"{type(pipe).__name__} has no SD3Transformer2DModel: not a Stable Diffusion 3 pipeline")
        pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
        if transformer.config.pooled_projection_dim != pooled:
            raise EraseError(f"the transformer takes {transformer.config.pooled_projection_dim}-dim pooled text but "
                             f"the CLIP encoders project to {pooled}: the components do not belong together")

    def _training_scheduler(self, shipped):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(shipped.config)

    def _encode_prompts(self, prompts: list[str]) -> Condition:
        device = self.components["text_encoder"].device
        embeds, _, pooled, _ = self.pipeline().encode_prompt(prompts, None, None, device=device,
                                                             num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Condition(encoder_hidden_states=embeds, pooled_projections=pooled)

    def _condition_from_text_encoders(self, outputs, n: int) -> Condition:
        # As the pipeline: the CLIP penultimate states side by side, zero-padded to the T5 width, then
        # T5's states along the sequence (zeros without T5); the two CLIP projections side by side.
        if self.components.get("text_encoder_3") is not None:
            raise EraseError("the token attacks edit the CLIP encoders' token embeddings, which T5 does not "
                             "read: they run on SD3 models without T5 (text_encoder_3 None in model_index.json, "
                             "as models/mini-flow ships)")
        clip = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
        t5 = self.pipeline()._get_t5_prompt_embeds([""] * n, device=clip.device, dtype=clip.dtype)
        embeds = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=-2)
        return Condition(encoder_hidden_states=embeds,
                         pooled_projections=torch.cat([out.text_embeds for out in outputs], dim=-1))

    def text_entry_layers(self) -> dict:
        # The text stream's entry, where every token row goes through one linear map before any block
        # (the joint blocks' context projections read it after a timestep-modulated norm, which a
        # closed form per layer cannot hold for every timestep).
        return {"context_embedder": self.denoiser.context_embedder}

    def text_entries(self) -> dict:
        return {**super().text_entries(), "pooled": self.pooled_text_entry()}

    def _text_segments(self) -> list[tuple[str, int]]:
        # The CLIP states (zero-padded to the T5 width), then T5's; without T5 its rows are zeros,
        # which every linear map sends to its bias whatever the weights: no segment to edit.
        segments = [("tokenizer", self.components["tokenizer"].model_max_length)]
        if self.components.get("text_encoder_3") is not None:
            segments.append(("tokenizer_3", None))  # the rest of the sequence
        return segments

    def _forward(self, denoiser, x_t, t, cond):
        c = cond.tensors
        return denoiser(hidden_states=x_t, timestep=t, encoder_hidden_states=c["encoder_hidden_states"],
                        pooled_projections=c["pooled_projections"]).sample

    def _pipeline_inputs(self, cond, negative):
        return {"prompt_embeds": cond.tensors["encoder_hidden_states"],
                "pooled_prompt_embeds": cond.tensors["pooled_projections"],
                "negative_prompt_embeds": negative.tensors["encoder_hidden_states"],
                "negative_pooled_prompt_embeds": negative.tensors["pooled_projections"]}
