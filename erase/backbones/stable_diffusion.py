"""Stable Diffusion 1.x and 2.x: `UNet2DConditionModel` cross-attending to one CLIP text encoder.

The UNet predicts what its scheduler config says: ε (SD 1.x, SD 2.x base) or v (SD 2.x at 768 px,
`prediction_type: v_prediction`); training targets and DDIM sampling follow it (`DDPMSchedule`).
Models load from a Hub id (`CompVis/stable-diffusion-v1-4`, SD 1.5, SD 2.x), a local pipeline
folder, or a single `.safetensors` / `.ckpt` file in the original LDM layout.
"""

from __future__ import annotations

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
    EXPORT_FORMATS = ("diffusers-lora", "webui-lora", "single-file")
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

    def single_file_state_dict(self):
        """SD 1.x's LDM layout, checked against diffusers' own single-file converters (`ldm_layout`)."""
        from .ldm_layout import check_round_trip, to_ldm_state_dict

        state = to_ldm_state_dict(self.unet, self.vae, self.text_encoder)
        check_round_trip(state, self.unet, self.vae, self.text_encoder)
        return state

    def _encode_prompts(self, prompts: list[str]) -> Condition:
        embeds, _ = self.pipeline().encode_prompt(prompts, self.text_encoder.device, 1, False)
        return Condition(encoder_hidden_states=embeds)

    def _forward(self, denoiser, x_t, t, cond):
        return denoiser(x_t, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"]).sample

    def _pipeline_inputs(self, cond, negative):
        return {"prompt_embeds": cond.tensors["encoder_hidden_states"],
                "negative_prompt_embeds": negative.tensors["encoder_hidden_states"]}

    def _condition_from_text_encoders(self, outputs, n: int) -> Condition:
        # The pipeline's encoding without clip_skip: the encoder's last hidden states.
        return Condition(encoder_hidden_states=outputs[0].last_hidden_state)
