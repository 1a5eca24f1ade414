"""Class-conditional DDPM backbone: a diffusers `UNet2DModel` with class embeddings.

The UNet has `K + 1` class embeddings; index `K` is the null class used for classifier-free
guidance (the model is trained with the label replaced by it 10% of the time). Sampling is DDIM
with the conditional and unconditional predictions computed in one batched forward pass.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from ..outputs import check_finished
from ..utils import EraseError, atomic_dir, read_json, step_generator, write_json

MODEL_FILE = "erase_model.json"
BACKBONE_NAME = "class-ddpm"

# Parameter groups this backbone offers, as predicates on parameter names. Cross-attention groups
# (`xattn`, `noxattn`, `xattn-kv`) belong to text-conditioned UNets and are refused here.
PARAMETER_GROUPS = {
    "all": lambda name: True,
    "attn": lambda name: ".attentions." in name,
    "noattn": lambda name: ".attentions." not in name,
    "class-emb": lambda name: name.startswith("class_embedding."),
}


class ClassConditionalDDPM:
    """A class-conditional diffusion model: UNet, noise schedule and class names.

    This is the object that unlearning methods and the evaluation talk to. They never look at the
    UNet's type: they ask for conditions, noise predictions and parameter groups.
    """

    name = BACKBONE_NAME

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
    def sample_defaults(self) -> dict:
        """Steps, guidance and eta to sample with when the user gives none: the model's measured
        values (`info.sample_defaults`, see models/README.md), else 50 DDIM steps at scale 3."""
        recorded = self.info.get("sample_defaults", {})
        return {k: recorded.get(k, v) for k, v in {"steps": 50, "guidance": 3.0, "eta": 0.0}.items()}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_class(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: torch.device | str) -> "ClassConditionalDDPM":
        self.unet.to(device)
        return self

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

    def encode_conditions(self, classes: Iterable[int | str]) -> torch.Tensor:
        """Condition tensor for a list of classes (ids or names)."""
        return torch.tensor([self.class_index(c) for c in classes], dtype=torch.long, device=self.device)

    def null_condition(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.null_class, dtype=torch.long, device=self.device)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                      unet: torch.nn.Module | None = None) -> torch.Tensor:
        """ε(x_t, t, c) from the trainable UNet, or from `unet` (a frozen reference copy)."""
        return (unet or self.unet)(x_t, t, class_labels=cond).sample

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def parameter_groups(self) -> list[str]:
        return list(PARAMETER_GROUPS)

    def trainable_parameters(self, group: str = "all") -> dict[str, torch.nn.Parameter]:
        """The UNet parameters of `group`, by name."""
        if group not in PARAMETER_GROUPS:
            hint = (" (cross-attention exists only in text-conditioned UNets)"
                    if group.startswith(("xattn", "noxattn")) else "")
            raise EraseError(f"parameter group {group!r} does not exist for the {self.name} backbone{hint}; "
                             f"choose one of {', '.join(PARAMETER_GROUPS)}")
        keep = PARAMETER_GROUPS[group]
        return {n: p for n, p in self.unet.named_parameters() if keep(n)}

    def unlearn_data(self, forget, retain=None, anchor=None, dataset: str | None = None, images: int | None = None):
        """Forget/retain sets for class erasure: real images of the classes (see `erase.unlearn_data`)."""
        from ..unlearn_data import class_erasure_data

        if images is not None:
            raise EraseError("--images sets how many images are generated for a text concept; class "
                             "erasure uses the dataset's real images (choose them with --dataset)")
        return class_erasure_data(self, forget, retain, anchor, dataset)

    def frozen_copy(self) -> torch.nn.Module:
        """A frozen copy of the current UNet: the reference model ε_0 of the methods."""
        ref = copy.deepcopy(self.unet).eval()
        ref.requires_grad_(False)
        return ref

    # -- sampling -----------------------------------------------------------------------------------
    def guided_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        """Classifier-free guided ε: conditional and unconditional rows in one batched forward."""
        if guidance == 1.0:
            return self.predict_noise(x_t, t, cond)
        both = self.predict_noise(torch.cat([x_t, x_t]), t, torch.cat([cond, self.null_condition(len(cond))]))
        eps_c, eps_u = both.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T for each seed, drawn on the CPU so that it does not depend on device or batch."""
        return torch.stack([torch.randn(self.image_shape, generator=step_generator(s)) for s in seeds])

    @torch.inference_mode()
    def sample(self, classes: Sequence[int | str], seeds: Sequence[int], steps: int = 50,
               guidance: float = 3.0, eta: float = 0.0, batch_size: int = 64,
               progress: bool = False) -> torch.Tensor:
        """DDIM samples in [-1, 1], one per (class, seed) pair, on the CPU.

        Guidance is the scale `s` of `ε_∅ + s·(ε_c − ε_∅)`; the SA/SalUn papers write it
        `(1 + w)·ε_c − w·ε_∅`, so their `w = 2` is `s = 3`. `s = 1` is plain conditional sampling.
        Image i depends only on (classes[i], seeds[i]) and `batch_size`: not on how many images
        are requested, their order, or the process that makes them. The UNet always runs on
        exactly `batch_size` images (the last chunk is padded), because CPU and GPU kernels round
        differently for different batch shapes but identically for the same shape.
        """
        if len(classes) != len(seeds):
            raise EraseError(f"{len(classes)} classes but {len(seeds)} seeds: give one seed per image")
        if steps < 1:
            raise EraseError(f"steps must be at least 1, got {steps}")
        labels = self.encode_conditions(classes)
        out = []
        chunks = range(0, len(seeds), batch_size)
        if progress:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc="sampling", unit="batch")
        for start in chunks:
            chunk_labels = labels[start:start + batch_size]
            chunk_seeds = list(seeds[start:start + batch_size])
            n = len(chunk_seeds)
            pad = batch_size - n
            chunk_labels = torch.cat([chunk_labels, chunk_labels[-1:].expand(pad)])
            chunk_seeds += chunk_seeds[-1:] * pad
            out.append(self._sample_batch(chunk_labels, chunk_seeds, steps, guidance, eta)[:n])
        return torch.cat(out) if out else torch.empty(0, *self.image_shape)

    def _sample_batch(self, labels: torch.Tensor, seeds: list[int], steps: int, guidance: float,
                      eta: float) -> torch.Tensor:
        device = self.device
        dtype = self.unet.dtype
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        x = self.initial_noise(seeds).to(device, dtype)
        # One generator per image for the stochastic part of DDIM (eta > 0).
        gens = [step_generator(s, 1) for s in seeds]
        self.unet.eval()
        for t in scheduler.timesteps:
            eps = self.guided_noise(x, t.to(device), labels, guidance)
            noise = None
            if eta > 0:
                noise = torch.stack([torch.randn(self.image_shape, generator=g) for g in gens]).to(device, dtype)
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        return x.float().clamp(-1, 1).cpu()

    # -- attack hooks ---------------------------------------------------------------------------------
    # What the attacks of `erase.eval.attacks` need beyond sampling: the condition as a vector. The
    # UNet is never changed by them; a condition is overridden only inside a `with` block.
    def condition_vector(self, cls: int | str) -> torch.Tensor:
        """A copy of the class embedding of `cls` (an id, a name, or the null class's id), shape (D,)."""
        index = self.null_class if cls == self.null_class else self.class_index(cls)
        return self.unet.class_embedding.weight[index].detach().clone()

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
