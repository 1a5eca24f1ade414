"""Stable Diffusion backbone: a text-conditioned latent diffusion pipeline behind the backbone interface.

The VAE and the text encoder are frozen; only the UNet trains. Conditions are prompt strings,
encoded once by the text encoder and cached per prompt; the null condition is the empty prompt's
embedding (what classifier-free guidance uses). Samples are the latents the methods train on: VAE
latents multiplied by the VAE's scaling factor, as in the original LDM training.

Models load from a Hub id (`CompVis/stable-diffusion-v1-4`, SD 1.5, SD 2.x), a local
`save_pretrained` pipeline folder, or a single `.safetensors` / `.ckpt` file in the original LDM
layout. The safety checker is never loaded: the erasure benchmarks measure what the model itself
draws, and a checker that blacks out images would hide it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Sequence

import torch

from ..outputs import check_finished
from ..utils import EraseError, atomic_dir, read_json, step_generator, write_json

BACKBONE_NAME = "stable-diffusion"
INFO_FILE = "erase_info.json"  # beside model_index.json; stock diffusers ignores it
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _is_time_or_output(name: str) -> bool:
    return name.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))


# Parameter groups as predicates on UNet parameter names. `noxattn` follows the ESD authors' script
# (train-esd.py): besides cross-attention it also leaves the time embedding and the output layers
# (LDM `time_embed`, `out.0`, `out.2`) frozen, so ESD-u changes what the model draws, not how it
# denoises in general.
PARAMETER_GROUPS = {
    "all": lambda name: True,
    "xattn": lambda name: ".attn2." in name,
    "noxattn": lambda name: ".attn2." not in name and not _is_time_or_output(name),
    "xattn-kv": lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name,
}


class StableDiffusionBackbone:
    """VAE + CLIP text encoder + UNet2DConditionModel + noise schedule, as the methods see them."""

    name = BACKBONE_NAME

    def __init__(self, pipe, info: dict | None = None):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
            raise EraseError(f"{type(pipe).__name__} has no UNet2DConditionModel: not a Stable Diffusion pipeline")
        if not isinstance(getattr(pipe, "vae", None), AutoencoderKL):
            raise EraseError(f"{type(pipe).__name__} has no AutoencoderKL: not a Stable Diffusion pipeline")
        hidden = pipe.text_encoder.config.hidden_size
        if pipe.unet.config.cross_attention_dim != hidden:
            raise EraseError(f"the UNet attends to {pipe.unet.config.cross_attention_dim}-dim text features but "
                             f"the text encoder makes {hidden}-dim ones: the components do not belong together")
        self.unet = pipe.unet
        self.vae = pipe.vae.requires_grad_(False).eval()
        self.text_encoder = pipe.text_encoder.requires_grad_(False).eval()
        self.tokenizer = pipe.tokenizer
        # Training noise follows the model's own schedule (betas, T) whatever sampler it ships with;
        # the shipped sampler is kept for save_pretrained, so a saved model samples as it came.
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.pipeline_scheduler = pipe.scheduler
        self.info = dict(info or {})
        self._embeddings: dict[str, torch.Tensor] = {}

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str | Path, config: str | Path | None = None,
                        frozen_dtype: torch.dtype | None = None) -> "StableDiffusionBackbone":
        """Load a pipeline folder, a Hub id, or a single LDM checkpoint file.

        `config`: for a single file, a local diffusers pipeline folder of the same architecture whose
        component configs (and tokenizer) to use; without it diffusers fetches them from the Hub.
        `frozen_dtype`: dtype of the frozen VAE and text encoder (e.g. torch.float16 on a GPU);
        the UNet stays float32 so that its optimizer keeps full-precision weights, and mixed
        precision comes from autocast in the training loop.
        """
        from diffusers import StableDiffusionPipeline

        text = str(source)
        path = Path(source).expanduser()
        kwargs = {"safety_checker": None, "requires_safety_checker": False}
        if path.is_file():
            pipe = cls._load_single_file(path, config, kwargs)
        elif path.is_dir():
            index = read_json(path / "model_index.json", what="diffusers pipeline index")
            kind = index.get("_class_name")
            if "unet" not in index or "text_encoder_2" in index:
                raise EraseError(f"{path} holds a {kind} pipeline, not Stable Diffusion 1.x/2.x "
                                 "(needs one text encoder and a UNet)")
            if (path / INFO_FILE).is_file():
                check_finished(path, read_json(path / INFO_FILE, what="model info").get("info", {}))
            pipe = cls._wrap_errors(path, lambda: StableDiffusionPipeline.from_pretrained(
                path, use_safetensors=True, **kwargs))
        elif text.count("/") == 1 and not text.startswith((".", "/", "~")):
            # A Hub id; safetensors only, so nothing is unpickled.
            pipe = cls._wrap_errors(text, lambda: StableDiffusionPipeline.from_pretrained(
                text, use_safetensors=True, **kwargs))
        else:
            raise EraseError(f"model {text} does not exist (expected a pipeline folder, a .safetensors/.ckpt "
                             "file or a Hub id such as CompVis/stable-diffusion-v1-4)")
        backbone = cls(pipe)
        info_path = path / INFO_FILE
        if path.is_dir() and info_path.is_file():
            backbone.info = read_json(info_path, what="model info").get("info", {})
        backbone.info["source"] = text  # what was loaded now, not what an earlier save was made from
        if frozen_dtype is not None:
            backbone.vae.to(dtype=frozen_dtype)
            backbone.text_encoder.to(dtype=frozen_dtype)
        return backbone

    @staticmethod
    def _wrap_errors(what, load):
        """Turn loader failures (missing files, offline Hub, mismatched weights) into EraseError."""
        from diffusers.loaders.single_file_utils import SingleFileComponentError

        try:
            return load()
        except EraseError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SingleFileComponentError) as e:
            raise EraseError(f"could not load a Stable Diffusion pipeline from {what}: {e}") from None

    @classmethod
    def _load_single_file(cls, path: Path, config, kwargs):
        from diffusers import StableDiffusionPipeline

        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise EraseError(f"{path} is a file but not a checkpoint: expected {' or '.join(SINGLE_FILE_SUFFIXES)}")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
            if not any(k.startswith("model.diffusion_model.") for k in keys):
                raise EraseError(f"{path} is not a Stable Diffusion checkpoint in the original LDM layout "
                                 "(no model.diffusion_model.* weights); a diffusers model is a folder with "
                                 "model_index.json")
        extra = {}
        if config is not None:
            if not (Path(config) / "model_index.json").is_file():
                raise EraseError(f"config {config} is not a diffusers pipeline folder (no model_index.json)")
            extra = {"config": str(config), "local_files_only": True}
        # .ckpt files are read by diffusers with torch.load(weights_only=True): tensors only, no code.
        return cls._wrap_errors(path, lambda: StableDiffusionPipeline.from_single_file(str(path), **extra, **kwargs))

    def pipeline(self, scheduler=None):
        """A stock StableDiffusionPipeline sharing this backbone's modules (no copies)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or DDIMScheduler.from_config(self.scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def save_pretrained(self, path: str | Path, **info) -> None:
        """A standard pipeline folder (safetensors) that stock diffusers loads, plus erase_info.json."""
        self.info.update(info)
        with atomic_dir(path) as tmp:
            self.pipeline(scheduler=self.pipeline_scheduler).save_pretrained(tmp, safe_serialization=True)
            write_json(tmp / INFO_FILE, {"backbone": BACKBONE_NAME, "info": self.info})

    def save_delta(self, path: str | Path, group: str = "all") -> None:
        """The UNet weights of `group` as one safetensors file: `pipe.unet.load_state_dict(d, strict=False)`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().cpu().contiguous() for n, p in self.trainable_parameters(group).items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"group": group})
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    # -- what methods ask ---------------------------------------------------------------------------
    @property
    def sample_defaults(self) -> dict:
        """Steps, guidance and eta when the user gives none: the pipeline's recorded values
        (`info.sample_defaults`, e.g. the mini-SD's measured guidance), else SD's 50 steps at 7.5."""
        recorded = self.info.get("sample_defaults", {})
        return {k: recorded.get(k, v) for k, v in {"steps": 50, "guidance": 7.5, "eta": 0.0}.items()}

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * (2 ** (len(self.vae.config.block_out_channels) - 1))

    def to(self, device: torch.device | str) -> "StableDiffusionBackbone":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        self._embeddings = {p: e.to(device) for p, e in self._embeddings.items()}
        return self

    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (N, seq, dim) of the prompts; each distinct prompt is encoded once."""
        if isinstance(prompts, str):
            raise EraseError("encode_conditions takes a list of prompts, got a single string")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing:
            tokens = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt")
            hidden = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]
            self._embeddings.update(zip(missing, hidden))
        return torch.stack([self._embeddings[p] for p in prompts]).to(self.device, self.unet.dtype)

    def null_condition(self, n: int) -> torch.Tensor:
        return self.encode_conditions([""] * n)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                      unet: torch.nn.Module | None = None) -> torch.Tensor:
        """ε(x_t, t, c) from the trainable UNet, or from `unet` (a frozen reference copy)."""
        return (unet or self.unet)(x_t, t, encoder_hidden_states=cond).sample

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def parameter_groups(self) -> list[str]:
        return list(PARAMETER_GROUPS)

    def trainable_parameters(self, group: str = "all") -> dict[str, torch.nn.Parameter]:
        """The UNet parameters of `group`, by name (names as in `unet.state_dict()`)."""
        if group not in PARAMETER_GROUPS:
            raise EraseError(f"parameter group {group!r} does not exist for the {self.name} backbone; "
                             f"choose one of {', '.join(PARAMETER_GROUPS)}")
        keep = PARAMETER_GROUPS[group]
        params = {n: p for n, p in self.unet.named_parameters() if keep(n)}
        if not params:
            raise EraseError(f"parameter group {group!r} is empty for this UNet (it has no cross-attention "
                             "layers?); choose another group")
        return params

    def unlearn_data(self, forget, retain=None, anchor=None, dataset: str | None = None, images: int | None = None):
        """Forget/retain sets for a text concept: images this model generates from the concept's
        forget, anchor and retain prompts, cached as latents (see `erase.concept_data`).

        `forget` is a shipped concept name (`nudity`), a concept folder or a literal prompt; `anchor`
        and `retain` override the concept's anchor prompt and retain prompts (file or comma list).
        """
        from ..concept_data import ConceptDataConfig, concept_unlearn_data
        from ..concepts import load_concept

        if dataset is not None:
            raise EraseError("--dataset applies to class-conditional models; a text concept's images are "
                             "generated from its prompts (set how many with --images)")
        if isinstance(retain, str) and not Path(retain).expanduser().is_file():
            retain = [p.strip() for p in retain.split(",") if p.strip()]
        config = ConceptDataConfig() if images is None else ConceptDataConfig(images=images)
        return concept_unlearn_data(self, load_concept(forget, anchor=anchor, retain=retain), config)

    def frozen_copy(self) -> torch.nn.Module:
        """A frozen copy of the current UNet: the reference model ε_0 of the methods."""
        ref = copy.deepcopy(self.unet).eval()
        ref.requires_grad_(False)
        return ref

    # -- images and latents ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images in [-1, 1], (N, 3, H, W).

        The posterior mean, not a sample: the cached training latents are then a function of the
        images alone (the posterior's std is tiny for SD's VAE, so nothing is lost).
        """
        vae = self.vae
        latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
        return (latents * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        images = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        return images.float().clamp(-1, 1)

    # -- sampling -----------------------------------------------------------------------------------
    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T for each seed, drawn on the CPU so that it does not depend on device or batch."""
        return torch.stack([torch.randn(self.latent_shape, generator=step_generator(s)) for s in seeds])

    @torch.inference_mode()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50, guidance: float = 7.5,
               eta: float = 0.0, batch_size: int = 8, negative_prompt: str = "", progress: bool = False,
               return_latents: bool = False) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) on the CPU, one per (prompt, seed), by a stock
        StableDiffusionPipeline with DDIM and classifier-free guidance `guidance` (batched: the
        pipeline runs the conditional and unconditional halves in one UNet call).

        Like the DDPM backbone, image i depends only on (prompts[i], seeds[i]) and `batch_size`:
        the pipeline always runs on exactly `batch_size` prompts, the last chunk padded.
        `return_latents` gives the final scaled latents instead of decoded images.
        """
        if len(prompts) != len(seeds):
            raise EraseError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per image")
        if steps < 1:
            raise EraseError(f"steps must be at least 1, got {steps}")
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)
        self.unet.eval()
        # With half-precision frozen parts (frozen_dtype) the float32 UNet runs under autocast, and
        # the latents are decoded here, where they are cast to the VAE's dtype.
        mixed = self.vae.dtype != self.unet.dtype
        out = []
        chunks = range(0, len(seeds), batch_size)
        if progress:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc="sampling", unit="batch")
        for start in chunks:
            chunk_prompts = list(prompts[start:start + batch_size])
            chunk_seeds = list(seeds[start:start + batch_size])
            n = len(chunk_seeds)
            pad = batch_size - n
            chunk_prompts += chunk_prompts[-1:] * pad
            chunk_seeds += chunk_seeds[-1:] * pad
            with torch.autocast(self.device.type, dtype=self.vae.dtype, enabled=mixed):
                latents = pipe(
                    prompt_embeds=self.encode_conditions(chunk_prompts),
                    negative_prompt_embeds=self.encode_conditions([negative_prompt] * batch_size),
                    latents=self.initial_noise(chunk_seeds).to(self.device, self.unet.dtype),
                    # One generator per image for the stochastic part of DDIM (eta > 0).
                    generator=[step_generator(s, 1) for s in chunk_seeds],
                    num_inference_steps=steps, guidance_scale=guidance, eta=eta, output_type="latent",
                ).images.float()
            # Decoded at the full batch size too, for the same reason as the sampling itself.
            out.append((latents if return_latents else self.decode_latents(latents))[:n].cpu())
        if not out:
            shape = self.latent_shape if return_latents else (3, self.image_size, self.image_size)
            return torch.empty(0, *shape)
        return torch.cat(out)

    # -- attack hooks ---------------------------------------------------------------------------------
    # What the attacks of `erase.eval.attacks` need beyond prompts: the text encoder fed with token
    # embeddings (learned tokens, adversarial prefixes), and a DDIM sampler that gradients can run
    # through (latent-inversion attacks). None of them changes a weight.
    @torch.no_grad()
    def token_embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's input token embeddings of the prompts, padded to the tokenizer's length
        (N, L, D), and each prompt's token count including its start and end tokens (N,)."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.text_encoder.device)
        return self.text_encoder.get_input_embeddings()(ids).float(), tokens.attention_mask.sum(1)

    def encode_token_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Text conditions (N, L, cross-attention dim) from input token embeddings (N, L, D), as
        `encode_conditions` makes them from token ids: position embeddings and the causal
        transformer are the encoder's own; differentiable in `embeddings`."""
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
        return hidden.to(self.unet.dtype)

    def denoise(self, latents: torch.Tensor, cond: torch.Tensor, steps: int, guidance: float,
                uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Final latents of deterministic DDIM (eta 0) from initial `latents` under conditions `cond`
        (N, L, dim), with classifier-free guidance against `uncond` (default: the empty prompt).

        The same computation as `sample(..., return_latents=True)` (the stock pipeline: DDIM from
        this model's schedule, guidance above 1 only), written out so that gradients can flow to
        `latents` and `cond`. Run it under `torch.no_grad()` to sample.
        """
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        guided = guidance > 1.0
        if guided:
            uncond = self.null_condition(len(cond)) if uncond is None else uncond
            both = torch.cat([uncond, cond])
        x = latents.to(self.device, self.unet.dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            if guided:
                eps_u, eps_c = self.predict_noise(torch.cat([x, x]), t, both).chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            else:
                eps = self.predict_noise(x, t, cond)
            x = scheduler.step(eps, t, x).prev_sample
        return x

    def invert(self, latents: torch.Tensor, cond: torch.Tensor, steps: int) -> torch.Tensor:
        """DDIM inversion: the starting latents from which `denoise(..., cond, steps, guidance=1)`
        returns approximately `latents` (final scaled latents, e.g. an image's `encode_images`)."""
        from diffusers import DDIMInverseScheduler

        scheduler = DDIMInverseScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        x = latents.to(self.device, self.unet.dtype)
        for t in scheduler.timesteps:
            x = scheduler.step(self.predict_noise(x, t, cond), t, x).prev_sample
        return x

    @contextlib.contextmanager
    def override_condition(self, condition: torch.Tensor, replacement: torch.Tensor):
        """Inside the block, the trainable UNet reads the text condition `condition` (L, dim) as
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

        handle = self.unet.register_forward_pre_hook(replace_rows, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
