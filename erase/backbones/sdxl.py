"""Stable Diffusion XL: a `UNet2DConditionModel` conditioned on two CLIP text encoders and micro-conditions.

SDXL's condition has three parts, all in one `Condition`: the two encoders' penultimate hidden
states side by side (`encoder_hidden_states`, cross-attended), the second encoder's pooled
projection (`text_embeds`) and the size/crop micro-conditions (`time_ids`: original size, crop
corner, target size), which both enter through the UNet's added embedding. Training conditions
use the native resolution with no crop, what the pipeline samples with by default. The null
condition is what the pipeline uses for an empty negative prompt: zeros when the model's
`force_zeros_for_empty_prompt` is set (SDXL base), else the empty prompt's encoding.
"""

from __future__ import annotations

import torch

from ..utils import EraseError
from .base import Condition, DDPMSchedule
from .pipeline import TextToImageBackbone
from .stable_diffusion import _is_time_or_output


def _enters_condition(name: str) -> bool:
    return ".attn2." in name or name.startswith("add_embedding.")


UNET_XL_GROUPS = {
    "all": lambda name: True,
    # Cross-attention and the added embedding, through which the pooled text and time ids enter.
    "condition": _enters_condition,
    "nocondition": lambda name: not _enters_condition(name) and not _is_time_or_output(name),
    "xattn": lambda name: ".attn2." in name,  # ESD-x's set, as on SD 1.x
    "xattn-kv": lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name,
}


class StableDiffusionXLBackbone(DDPMSchedule, TextToImageBackbone):
    """VAE + two CLIP text encoders + UNet2DConditionModel (text_time added embedding) + noise schedule."""

    name = "stable-diffusion-xl"
    PIPELINE = "StableDiffusionXLPipeline"
    PIPELINE_NAMES = ("StableDiffusionXLPipeline",)
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
    CLIP_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    SINGLE_FILE_PREFIXES = ("model.diffusion_model.input_blocks.", "conditioner.embedders.1.")
    PIPELINE_KWARGS = {"add_watermarker": False}  # a watermark would change what the metrics see
    PARAMETER_GROUPS = UNET_XL_GROUPS
    EXPORT_FORMATS = ("diffusers-lora", "webui-lora")
    GROUP_ALIASES = {"noxattn": "nocondition"}
    accepts_description = ("a StableDiffusionXLPipeline folder or Hub id, or a single SDXL checkpoint "
                           "(model.diffusion_model.* and conditioner.embedders.1.* weights)")

    def _check(self, pipe) -> None:
        from diffusers import UNet2DConditionModel

        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, UNet2DConditionModel) or unet.config.addition_embed_type != "text_time":
            raise EraseError(f"{type(pipe).__name__} has no UNet2DConditionModel with SDXL's text_time embedding")
        width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        if unet.config.cross_attention_dim != width:
            raise EraseError(f"the UNet attends to {unet.config.cross_attention_dim}-dim text features but the two "
                             f"text encoders make {width}: the components do not belong together")

    def _time_ids(self, n: int) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        ids = self.pipeline()._get_add_time_ids(size, (0, 0), size, torch.float32,
                                                self.components["text_encoder_2"].config.projection_dim)
        return ids.repeat(n, 1)

    def _encode_prompts(self, prompts: list[str]) -> Condition:
        device = self.components["text_encoder"].device
        embeds, _, pooled, _ = self.pipeline().encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=False)
        return Condition(encoder_hidden_states=embeds, text_embeds=pooled, time_ids=self._time_ids(len(prompts)))

    def _condition_from_text_encoders(self, outputs, n: int) -> Condition:
        # As the pipeline: both encoders' penultimate states side by side, the second one's projection.
        embeds = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
        return Condition(encoder_hidden_states=embeds, text_embeds=outputs[-1].text_embeds,
                         time_ids=self._time_ids(n).to(embeds.device))

    def null_condition(self, n: int) -> Condition:
        if not self.pipeline_config.get("force_zeros_for_empty_prompt", True):
            return super().null_condition(n)
        empty = self.encode_conditions([""] * n)
        return Condition(encoder_hidden_states=torch.zeros_like(empty.tensors["encoder_hidden_states"]),
                         text_embeds=torch.zeros_like(empty.tensors["text_embeds"]), time_ids=empty.tensors["time_ids"])

    def _forward(self, denoiser, x_t, t, cond):
        c = cond.tensors
        return denoiser(x_t, t, encoder_hidden_states=c["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}).sample

    def _pipeline_inputs(self, cond, negative):
        return {"prompt_embeds": cond.tensors["encoder_hidden_states"],
                "pooled_prompt_embeds": cond.tensors["text_embeds"],
                "negative_prompt_embeds": negative.tensors["encoder_hidden_states"],
                "negative_pooled_prompt_embeds": negative.tensors["text_embeds"]}
