"""Class-conditional DDPM backbone: a diffusers `UNet2DModel` with class embeddings.

The UNet has `K + 1` class embeddings; index `K` is the null class used for classifier-free
guidance (the model is trained with the label replaced by it 10% of the time). Sampling is DDIM
with the conditional and unconditional predictions computed in one batched forward pass.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Sequence

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..outputs import check_finished
from ..utils import EraseError, atomic_dir, read_json, step_generator, write_json
from .base import Backbone, Condition, DDPMSchedule, ModelSource

MODEL_FILE = "erase_model.json"
BACKBONE_NAME = "class-ddpm"


def _is_time_or_output(name: str) -> bool:
    return name.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))


# Parameter groups as predicates on parameter names. The condition enters through the class
# embedding; `nocondition` leaves it, the time embedding and the output layers frozen (ESD-u's set).
PARAMETER_GROUPS = {
    "all": lambda name: True,
    "condition": lambda name: name.startswith("class_embedding."),
    "nocondition": lambda name: not name.startswith("class_embedding.") and not _is_time_or_output(name),
    "attn": lambda name: ".attentions." in name,
    "noattn": lambda name: ".attentions." not in name,
}


class ClassConditionalDDPM(DDPMSchedule, Backbone):
    """A class-conditional diffusion model: UNet, noise schedule and class names.

    This is the object that unlearning methods and the evaluation talk to. They never look at the
    UNet's type: they ask for conditions, predictions and parameter groups (`erase.backbones.base`).
    """

    name = BACKBONE_NAME
    condition_kind = "class"
    PARAMETER_GROUPS = PARAMETER_GROUPS
    GROUP_ALIASES = {"class-emb": "condition"}
    SAMPLE_DEFAULTS = {"steps": 50, "guidance": 3.0, "eta": 0.0}
    accepts_description = f"a folder with {MODEL_FILE} (written by `erase train-base` or `erase unlearn`)"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, class_names: Sequence[str],
                 info: dict | None = None):
        if unet.config.num_class_embeds != len(class_names) + 1:
            raise EraseError(
                f"checkpoint does not match: the UNet has {unet.config.num_class_embeds} class embeddings "
                f"(K classes + the null class) but {len(class_names)} class names were given")
        self.unet = unet
        self.scheduler = scheduler
        self.class_names = list(class_names)
        self.info = dict(info or {})

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def create(cls, class_names: Sequence[str], image_size: int, channels: int,
               block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
               attention_levels: Sequence[bool] = (False, True, False), norm_num_groups: int = 8,
               num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               beta_schedule: str = "linear") -> "ClassConditionalDDPM":
        """A fresh model; the defaults are the shipped digits model (1.1M parameters at 16x16)."""
        if len(attention_levels) != len(block_out_channels):
            raise EraseError("attention_levels needs one entry per resolution level "
                             f"({len(block_out_channels)}), got {len(attention_levels)}")
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        unet = UNet2DModel(
            sample_size=image_size, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=down, up_block_types=up, norm_num_groups=norm_num_groups,
            num_class_embeds=len(class_names) + 1,
        )
        scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                  beta_end=beta_end, beta_schedule=beta_schedule,
                                  prediction_type="epsilon", clip_sample=True)
        return cls(unet, scheduler, class_names)

    @classmethod
    def accepts(cls, source: ModelSource) -> bool:
        return source.kind == "folder" and (source.path / MODEL_FILE).is_file()

    @classmethod
    def from_source(cls, source: ModelSource) -> "ClassConditionalDDPM":
        model = cls.from_pretrained(source.path)
        model.info["source"] = source.text  # what was loaded now, not what an earlier save was made from
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ClassConditionalDDPM":
        path = Path(path)
        meta = read_json(path / MODEL_FILE, what="model description")
        if meta.get("backbone") != BACKBONE_NAME:
            raise EraseError(f"{path} holds a {meta.get('backbone')!r} model, not a {BACKBONE_NAME}")
        for sub in ("unet", "scheduler"):
            if not (path / sub).is_dir():
                raise EraseError(f"{path} is missing its {sub}/ folder: not a complete erase model")
        check_finished(path, meta.get("info") or {})
        try:
            unet = UNet2DModel.from_pretrained(path / "unet", use_safetensors=True)
            scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        except Exception as e:  # noqa: BLE001 - diffusers and safetensors raise many types for a damaged file
            raise EraseError(f"{path} cannot be loaded: its unet/ or scheduler/ files are damaged or truncated "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); copy or train the model "
                             "again") from None
        return cls(unet, scheduler, meta["class_names"], meta.get("info"))

    def save_pretrained(self, path: str | Path, **info) -> None:
        """Write a self-contained model folder atomically (safetensors + JSON configs)."""
        self.info.update(info)
        with atomic_dir(path) as tmp:
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            self.scheduler.save_pretrained(tmp / "scheduler")
            write_json(tmp / MODEL_FILE, {
                "backbone": BACKBONE_NAME,
                "class_names": self.class_names,
                "null_class": self.null_class,
                "image_shape": list(self.image_shape),
                "info": self.info,
            })

    # -- what methods ask ---------------------------------------------------------------------------
    @property
    def denoiser(self) -> UNet2DModel:
        return self.unet

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_class(self) -> int:
        return len(self.class_names)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    image_shape = sample_shape

    def class_index(self, cls: int | str) -> int:
        """A class id from an id or a name ('3' and 'three' both give 3 on the digits)."""
        if isinstance(cls, str):
            s = cls.strip()
            if s.lstrip("-").isdigit():
                cls = int(s)
            elif s in self.class_names:
                return self.class_names.index(s)
            else:
                raise EraseError(f"unknown class {cls!r}: the classes are "
                                 + ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names)))
        if not 0 <= cls < self.num_classes:
            raise EraseError(f"class id {cls} is out of range: this model has classes 0..{self.num_classes - 1}")
        return int(cls)

    def encode_conditions(self, classes: Iterable[int | str]) -> Condition:
        """Conditions for a list of classes (ids or names)."""
        labels = torch.tensor([self.class_index(c) for c in classes], dtype=torch.long, device=self.device)
        return Condition(class_labels=labels)

    def null_condition(self, n: int) -> Condition:
        return Condition(class_labels=torch.full((n,), self.null_class, dtype=torch.long, device=self.device))

    def _forward(self, denoiser, x_t, t, cond):
        return denoiser(x_t, t, class_labels=cond.tensors["class_labels"]).sample

    # -- sampling -----------------------------------------------------------------------------------
    def sample(self, classes: Sequence[int | str], seeds: Sequence[int], steps: int = 50,
               guidance: float = 3.0, eta: float = 0.0, batch_size: int = 64, **options) -> torch.Tensor:
        """DDIM samples in [-1, 1], one per (class, seed) pair, on the CPU (see `Backbone.sample`).

        Guidance is the scale `s` of `ε_∅ + s·(ε_c − ε_∅)`; the SA/SalUn papers write it
        `(1 + w)·ε_c − w·ε_∅`, so their `w = 2` is `s = 3`. `s = 1` is plain conditional sampling.
        """
        return super().sample(classes, seeds, steps=steps, guidance=guidance, eta=eta, batch_size=batch_size,
                              **options)

    def _sample_batch(self, classes, seeds, steps, guidance, eta, raw_seeds):
        device = self.device
        dtype = self.unet.dtype
        labels = self.encode_conditions(classes)
        scheduler = self.sampling_scheduler(steps)
        x = self.initial_noise(seeds, raw_seeds).to(device, dtype)
        # One generator per image for the stochastic part of DDIM (eta > 0).
        gens = [step_generator(s, 1) for s in seeds]
        for t in scheduler.timesteps:
            eps = self.guided_prediction(x, t.to(device), labels, guidance)
            noise = None
            if eta > 0:
                noise = torch.stack([torch.randn(self.sample_shape, generator=g) for g in gens]).to(device, dtype)
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        return x

    # -- attack hooks ---------------------------------------------------------------------------------
    # What the attacks of `erase.eval.attacks` and robust erasure (`erase.robust`) need beyond sampling:
    # the condition as a vector. The UNet is never changed by them; a condition is overridden only
    # inside a `with` block.
    def condition_vector(self, cls: int | str) -> torch.Tensor:
        """A copy of the class embedding of `cls` (an id, a name, or the null class's id), shape (D,)."""
        index = self.null_class if cls == self.null_class else self.class_index(cls)
        return self.unet.class_embedding.weight[index].detach().clone()

    def condition_vectors(self, cond: Condition) -> list[tuple[int, torch.Tensor]]:
        """(the class id `override_condition` matches, its embedding vector) per distinct class of `cond`."""
        return [(int(c), self.condition_vector(int(c))) for c in cond.tensors["class_labels"].unique()]

    @contextlib.contextmanager
    def override_condition(self, cls: int | str, vector: torch.Tensor):
        """Inside the block, class `cls` is embedded as `vector` (D,) instead of its table row.

        Predictions and samples for `cls` then use `vector`, differentiably (gradients reach
        `vector`, which is how class-embedding inversion learns it); other classes, the null class
        and the UNet's weights are untouched, and everything is back as it was after the block.
        """
        index = self.class_index(cls)
        if vector.shape != self.unet.class_embedding.weight.shape[1:]:
            raise EraseError(f"a condition vector for this model has shape "
                             f"{tuple(self.unet.class_embedding.weight.shape[1:])}, got {tuple(vector.shape)}")

        def replace_row(module, inputs, output):
            chosen = (inputs[0] == index).unsqueeze(-1)
            return torch.where(chosen, vector.to(output.device, output.dtype), output)

        handle = self.unet.class_embedding.register_forward_hook(replace_row)
        try:
            yield
        finally:
            handle.remove()
