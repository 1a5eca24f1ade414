"""Stable Diffusion 1.x and 2.x: `UNet2DConditionModel` cross-attending to one CLIP text encoder.

The UNet predicts what its scheduler config says: ε (SD 1.x, SD 2.x base) or v (SD 2.x at 768 px,
`prediction_type: v_prediction`); training targets and DDIM sampling follow it (`DDPMSchedule`).
Models load from a Hub id (`CompVis/stable-diffusion-v1-4`, SD 1.5, SD 2.x), a local pipeline
folder, or a single `.safetensors` / `.ckpt` file in the original LDM layout.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .base import Condition, DDPMSchedule
from .pipeline import TextToImageBackbone
from ..utils import EraseError

BACKBONE_NAME = "stable-diffusion"


def _is_time_or_output(name: str) -> bool:
    return name.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))


# Parameter groups as predicates on UNet parameter names. `nocondition` follows the ESD authors'
# script (train-esd.py): besides cross-attention it also leaves the time embedding and the output
# layers (LDM `time_embed`, `out.0`, `out.2`) frozen, so ESD-u changes what the model draws, not how
# it denoises in general.
UNET_GROUPS = {
    "all": lambda name: True,
    "condition": lambda name: ".attn2." in name,
    "nocondition": lambda name: ".attn2." not in name and not _is_time_or_output(name),
    "xattn-kv": lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name,
}
UNET_ALIASES = {"xattn": "condition", "noxattn": "nocondition"}


class StableDiffusionBackbone(DDPMSchedule, TextToImageBackbone):
    """VAE + CLIP text encoder + UNet2DConditionModel + noise schedule, as the methods see them."""

    name = BACKBONE_NAME
    PIPELINE = "StableDiffusionPipeline"
    PIPELINE_NAMES = ("StableDiffusionPipeline",)
    SINGLE_FILE_PREFIXES = ("model.diffusion_model.input_blocks.", "cond_stage_model.")
    PIPELINE_KWARGS = {"requires_safety_checker": False, "safety_checker": None}
    PARAMETER_GROUPS = UNET_GROUPS
    GROUP_ALIASES = UNET_ALIASES
    accepts_description = ("a StableDiffusionPipeline folder or Hub id (model_index.json), or a single SD 1.x/2.x "
                           "checkpoint in the LDM layout (model.diffusion_model.* and cond_stage_model.* weights)")

    def _check(self, pipe) -> None:
        from diffusers import UNet2DConditionModel

        if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
            raise EraseError(f"{type(pipe).__name__} has no UNet2DConditionModel: not a Stable Diffusion pipeline")
        hidden = pipe.text_encoder.config.hidden_size
        if pipe.unet.config.cross_attention_dim != hidden:
            raise EraseError(f"the UNet attends to {pipe.unet.config.cross_attention_dim}-dim text features but "
                             f"the text encoder makes {hidden}-dim ones: the components do not belong together")

    @property
    def unet(self):
        return self.denoiser

    @property
    def text_encoder(self):
        return self.components["text_encoder"]

    @property
    def tokenizer(self):
        return self.components["tokenizer"]

    def _encode_prompts(self, prompts: list[str]) -> Condition:
        embeds, _ = self.pipeline().encode_prompt(prompts, self.text_encoder.device, 1, False)
        return Condition(encoder_hidden_states=embeds)

    def _forward(self, denoiser, x_t, t, cond):
        return denoiser(x_t, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"]).sample

    def _pipeline_inputs(self, cond, negative):
        return {"prompt_embeds": cond.tensors["encoder_hidden_states"],
                "negative_prompt_embeds": negative.tensors["encoder_hidden_states"]}

    # -- attack hooks ---------------------------------------------------------------------------------
    # Besides the base's `denoise` and `invert`: the text encoder fed with token embeddings (learned
    # tokens, adversarial prefixes), and text conditions overridden for robust erasure.
    @torch.no_grad()
    def token_embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's input token embeddings of the prompts, padded to the tokenizer's length
        (N, L, D), and each prompt's token count including its start and end tokens (N,)."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.text_encoder.device)
        return self.text_encoder.get_input_embeddings()(ids).float(), tokens.attention_mask.sum(1)

    def encode_token_embeddings(self, embeddings: torch.Tensor) -> Condition:
        """Text conditions from input token embeddings (N, L, D), as `encode_conditions` makes them
        from token ids: position embeddings and the causal transformer are the encoder's own;
        differentiable in `embeddings`."""
        table = self.text_encoder.get_input_embeddings()
        if embeddings.ndim != 3 or embeddings.shape[-1] != table.embedding_dim:
            raise EraseError(f"token embeddings for this text encoder have shape (N, L, {table.embedding_dim}), "
                             f"got {tuple(embeddings.shape)}")
        # The ids only set the shape: a forward hook puts the given embeddings in place of their lookup.
        ids = torch.zeros(embeddings.shape[:2], dtype=torch.long, device=self.text_encoder.device)
        handle = table.register_forward_hook(lambda module, inputs, output: embeddings.to(output.dtype))
        try:
            hidden = self.text_encoder(ids)[0]
        finally:
            handle.remove()
        return Condition(encoder_hidden_states=hidden.to(self.denoiser.dtype))

    def condition_vectors(self, cond: Condition) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each distinct text embedding (L, dim) of `cond`, as what is matched and as its vector."""
        return [(row, row) for row in cond.tensors["encoder_hidden_states"].unique(dim=0)]

    @contextlib.contextmanager
    def override_condition(self, condition: torch.Tensor, replacement: torch.Tensor):
        """Inside the block, the trainable UNet reads the text embedding `condition` (L, dim) as
        `replacement` (L, dim) wherever it is given it, differentiably in `replacement`; other
        conditions, frozen reference copies and the weights are untouched (the counterpart of the
        class-conditional backbone's `override_condition`, for robust erasure)."""
        if replacement.shape != condition.shape:
            raise EraseError(f"a replacement condition must have the shape {tuple(condition.shape)}, "
                             f"got {tuple(replacement.shape)}")

        def replace_rows(module, args, kwargs):
            hidden = kwargs["encoder_hidden_states"]
            chosen = (hidden == condition.to(hidden)).flatten(1).all(1)[:, None, None]
            kwargs["encoder_hidden_states"] = torch.where(chosen, replacement.to(hidden), hidden)
            return args, kwargs

        handle = self.denoiser.register_forward_pre_hook(replace_rows, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
