"""What every text-to-image backbone built on a diffusers pipeline shares.

The VAE and the text encoders are frozen; only the denoiser (`unet` or `transformer`) trains.
Conditions are prompts, encoded by the stock pipeline's own `encode_prompt` (so training sees
exactly the conditioning the pipeline samples with) and cached per prompt. Samples are the latents
the methods train on (VAE latents shifted and scaled as the pipeline does). Sampling runs the stock
pipeline with the backbone's prompt embeddings, its null condition as the negative, and initial
noise drawn per image on the CPU.

A model loads from a Hub id, a local pipeline folder or a single checkpoint file in the original
layout (`config=` names a local pipeline folder of the same architecture for the component configs);
it saves as a standard pipeline folder (safetensors) that stock diffusers loads, plus erase_info.json.
A safety checker is never loaded: the erasure benchmarks measure what the model itself draws.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from ..outputs import check_finished
from ..utils import EraseError, atomic_dir, read_json, step_generator, write_json
from .base import Backbone, Condition, ModelSource, TextEntry, TextRows

INFO_FILE = "erase_info.json"  # beside model_index.json; stock diffusers ignores it

# Where the text enters a joint-attention transformer (diffusers' MMDiT layout, SD3 and FLUX alike):
# the text stream's attention projections and norms, the context embedder (the text sequence) and
# the pooled-text embedder beside the timestep embedding.
_JOINT_TEXT_ATTENTION = (".attn.add_q_proj.", ".attn.add_k_proj.", ".attn.add_v_proj.", ".attn.to_add_out.",
                         ".attn.norm_added_q.", ".attn.norm_added_k.")
_JOINT_CONDITION_INPUTS = ("context_embedder.", "time_text_embed.text_embedder.")


def _enters_joint_condition(name: str) -> bool:
    return name.startswith(_JOINT_CONDITION_INPUTS) or any(part in name for part in _JOINT_TEXT_ATTENTION)


def joint_transformer_groups(time_or_output: tuple[str, ...], attention: tuple[str, ...]) -> dict:
    """The parameter groups of a joint-attention transformer (SD3's and FLUX's share the layout).

    `condition` is where the text enters (above); `nocondition` is the rest without the parameters
    named by the prefixes `time_or_output` (the timestep embedding and the output layers), which stay
    frozen as on the UNets; `attn` is every parameter whose name holds one of `attention`; `text-kv`
    the text keys and values of the joint blocks (UCE's analogue of cross-attention keys and values).
    """
    return {
        "all": lambda name: True,
        "condition": _enters_joint_condition,
        "nocondition": lambda name: not _enters_joint_condition(name) and not name.startswith(time_or_output),
        "attn": lambda name: any(part in name for part in attention),
        "text-kv": lambda name: ".attn.add_k_proj." in name or ".attn.add_v_proj." in name,
    }


class TextToImageBackbone(Backbone):
    """A diffusers text-to-image pipeline behind the backbone contract. Subclasses set the class
    attributes and write `_check`, `_encode_prompts`, `_forward` and, where needed, `null_condition`."""

    condition_kind = "text"
    #: the diffusers pipeline class (by name), and the `_class_name`s of model_index.json it loads
    PIPELINE: ClassVar[str] = ""
    PIPELINE_NAMES: ClassVar[tuple[str, ...]] = ()
    #: pipeline attribute of the denoiser, and of the frozen text encoders
    DENOISER: ClassVar[str] = "unet"
    TEXT_ENCODERS: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: tensor-name prefixes that identify a single checkpoint file of this family (all must occur)
    SINGLE_FILE_PREFIXES: ClassVar[tuple[str, ...]] = ()
    #: extra keyword arguments of the pipeline class (e.g. no safety checker)
    PIPELINE_KWARGS: ClassVar[dict] = {}
    #: (text encoder, its tokenizer) pairs of the CLIP encoders whose input token embeddings the token
    #: attacks edit, in the order `_condition_from_text_encoders` receives their outputs
    CLIP_ENCODERS: ClassVar[tuple[tuple[str, str], ...]] = (("text_encoder", "tokenizer"),)

    def __init__(self, pipe, info: dict | None = None):
        from diffusers import AutoencoderKL

        self._check(pipe)
        if not isinstance(getattr(pipe, "vae", None), AutoencoderKL):
            raise EraseError(f"{type(pipe).__name__} has no AutoencoderKL: not a {self.name} pipeline")
        self.components = dict(pipe.components)
        for name in ("vae", *self.TEXT_ENCODERS):
            if self.components.get(name) is not None:
                self.components[name].requires_grad_(False).eval()
        self.pipeline_scheduler = pipe.scheduler  # kept for save_pretrained: a saved model samples as it came
        # Pipeline settings that are config, not modules (e.g. SDXL's force_zeros_for_empty_prompt).
        self.pipeline_config = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in self.components}
        self.scheduler = self._training_scheduler(pipe.scheduler)
        self.info = dict(info or {})
        self._embeddings: dict[str, Condition] = {}

    def _check(self, pipe) -> None:
        """Refuse a pipeline whose components do not belong to this family or to each other."""
        raise NotImplementedError

    def _training_scheduler(self, shipped):
        """The schedule training noises with, from the shipped sampler's config (betas, T, shift).

        Latents are never clipped to [-1, 1] (a DDIM default meant for pixels, which Euler configs
        such as SDXL's leave unset)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(shipped.config, clip_sample=False)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.DENOISER]

    @property
    def vae(self):
        return self.components["vae"]

    # -- loading and saving ---------------------------------------------------------------------------
    @classmethod
    def accepts(cls, source: ModelSource) -> bool:
        if source.kind == "file":
            return all(source.has_key_prefix(p) for p in cls.SINGLE_FILE_PREFIXES)
        return source.pipeline_class in cls.PIPELINE_NAMES

    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.PIPELINE)

    @classmethod
    def from_pretrained(cls, source: str | Path, **kwargs) -> "TextToImageBackbone":
        """Load a pipeline folder, a Hub id or a single checkpoint file as this backbone."""
        resolved = ModelSource.resolve(source)
        if not cls.accepts(resolved):
            raise EraseError(f"{source} is not a {cls.name} model (expected {cls.accepts_description})")
        return cls.from_source(resolved, **kwargs)

    @classmethod
    def stock_kwargs(cls, source: ModelSource) -> dict:
        """What the stock pipeline's `from_pretrained` needs besides the path to load `source` as we do."""
        # Components a folder records as absent (SD3 without T5, no safety checker) stay absent.
        absent = {name: None for name, entry in (source.index or {}).items() if entry == [None, None]}
        return {**absent, **cls.PIPELINE_KWARGS}

    @classmethod
    def from_source(cls, source: ModelSource, config: str | Path | None = None,
                    frozen_dtype: torch.dtype | None = None) -> "TextToImageBackbone":
        """`config`: for a single file, a local pipeline folder of the same architecture whose component
        configs (and tokenizers) to use; without it diffusers fetches them from the Hub.
        `frozen_dtype`: dtype of the frozen VAE and text encoders (e.g. torch.float16 on a GPU); the
        denoiser stays float32 so that its optimizer keeps full-precision weights, and mixed
        precision comes from autocast in the training loop."""
        kwargs = cls.stock_kwargs(source)
        pipeline_cls = cls.pipeline_class()
        if source.kind == "file":
            extra = {}
            if config is not None:
                if not (Path(config) / "model_index.json").is_file():
                    raise EraseError(f"config {config} is not a diffusers pipeline folder (no model_index.json)")
                extra = {"config": str(config), "local_files_only": True}
            # .ckpt files are read by diffusers with torch.load(weights_only=True): tensors only, no code.
            pipe = cls._wrap_errors(source.text, lambda: pipeline_cls.from_single_file(str(source.path), **extra,
                                                                                        **kwargs))
        else:
            if source.kind == "folder" and (source.path / INFO_FILE).is_file():
                # An `erase unlearn` output that an interruption or a hand edit left incomplete is refused.
                check_finished(source.path, read_json(source.path / INFO_FILE, what="model info").get("info", {}))
            # Safetensors only, so nothing is unpickled; a Hub id resolves through the local cache when offline.
            where = source.path if source.kind == "folder" else source.text
            pipe = cls._wrap_errors(where, lambda: pipeline_cls.from_pretrained(where, use_safetensors=True, **kwargs))
        backbone = cls(pipe)
        if source.kind == "folder" and (source.path / INFO_FILE).is_file():
            backbone.info = read_json(source.path / INFO_FILE, what="model info").get("info", {})
        backbone.info["source"] = source.text  # what was loaded now, not what an earlier save was made from
        if frozen_dtype is not None:
            for name in ("vae", *cls.TEXT_ENCODERS):
                if backbone.components.get(name) is not None:
                    backbone.components[name].to(dtype=frozen_dtype)
        return backbone

    @classmethod
    def _wrap_errors(cls, what, load):
        """Turn loader failures (missing files, offline Hub, mismatched weights) into EraseError."""
        from diffusers.loaders.single_file_utils import SingleFileComponentError

        try:
            return load()
        except EraseError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SingleFileComponentError) as e:
            raise EraseError(f"could not load a {cls.PIPELINE} from {what}: {e}") from None

    def pipeline(self, scheduler=None):
        """A stock diffusers pipeline sharing this backbone's modules (no copies)."""
        return self.pipeline_class()(**{**self.components, **self.pipeline_config, **self.PIPELINE_KWARGS,
                                        "scheduler": scheduler or self.pipeline_scheduler})

    def save_pretrained(self, path: str | Path, **info) -> None:
        """A standard pipeline folder (safetensors) that stock diffusers loads, plus erase_info.json."""
        self.info.update(info)
        with atomic_dir(path) as tmp:
            self.pipeline().save_pretrained(tmp, safe_serialization=True)
            write_json(tmp / INFO_FILE, {"backbone": self.name, "info": self.info})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TextToImageBackbone":
        for name in (self.DENOISER, "vae", *self.TEXT_ENCODERS):
            if self.components.get(name) is not None:
                self.components[name].to(device, dtype)
        return self

    # -- conditions ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> Condition:
        """The prompts' conditions; each distinct prompt is encoded once and cached."""
        if isinstance(prompts, str):
            raise EraseError("encode_conditions takes a list of prompts, got a single string")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing:
            encoded = self._encode_prompts(missing).to("cpu")
            self._embeddings.update((p, encoded[i]) for i, p in enumerate(missing))
        return Condition.cat([self._embeddings[p] for p in prompts]).to(self.device, self.denoiser.dtype)

    def _encode_prompts(self, prompts: list[str]) -> Condition:
        raise NotImplementedError

    def null_condition(self, n: int) -> Condition:
        return self.encode_conditions([""] * n)

    # -- images and latents ---------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.denoiser.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.sample_shape

    @property
    def image_size(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def _latent_scale(self) -> tuple[float, float]:
        config = self.vae.config
        return config.scaling_factor, getattr(config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images in [-1, 1], (N, 3, H, W), shifted and scaled as the pipeline's denoiser sees them.

        The posterior mean, not a sample: the cached training latents are then a function of the
        images alone (the posterior's std is tiny for SD's VAEs, so nothing is lost).
        """
        scale, shift = self._latent_scale()
        latents = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        return ((latents.float() - shift) * scale).float()

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        scale, shift = self._latent_scale()
        images = self.vae.decode((samples.to(self.vae.device, self.vae.dtype) / scale + shift)).sample
        return images.float().clamp(-1, 1)

    decode_latents = decode

    # -- sampling -----------------------------------------------------------------------------------
    def _pipeline_inputs(self, cond: Condition, negative: Condition) -> dict:
        """The pipeline's keyword arguments for prompt and negative conditions."""
        raise NotImplementedError

    def _sample_batch(self, prompts, seeds, steps, guidance, eta, raw_seeds, height: int | None = None,
                      width: int | None = None, negative_prompt: str = "", scheduler: str = "default"):
        """One batch through the stock pipeline; `scheduler="shipped"` samples with the pipeline's own
        scheduler instead of the backbone's sampler (DDIM, or flow-match Euler)."""
        if scheduler not in ("default", "shipped"):
            raise EraseError(f"scheduler must be 'default' or 'shipped', got {scheduler!r}")
        height, width = height or self.image_size, width or self.image_size
        f = self.vae_scale_factor
        if height % f or width % f:
            raise EraseError(f"height and width must be multiples of {f} for this model, got {height}x{width}")
        pipe = self.pipeline(scheduler=self.pipeline_scheduler if scheduler == "shipped"
                             else self.sampling_scheduler(steps))
        pipe.set_progress_bar_config(disable=True)
        shape = (self.sample_shape[0], height // f, width // f)
        negative = (self.null_condition(len(prompts)) if negative_prompt == ""
                    else self.encode_conditions([negative_prompt] * len(prompts)))
        extra = {"eta": eta} if "eta" in _call_parameters(pipe) else {}
        if eta and not extra:
            raise EraseError(f"{self.PIPELINE} samples deterministically: eta must be 0, got {eta}")
        # With half-precision frozen parts (frozen_dtype) the float32 denoiser runs under autocast.
        mixed = self.vae.dtype != self.denoiser.dtype
        with torch.autocast(self.device.type, dtype=self.vae.dtype, enabled=mixed):
            noise = self.initial_noise(seeds, raw_seeds, shape).to(self.device, self.denoiser.dtype)
            latents = pipe(**self._pipeline_inputs(self.encode_conditions(prompts), negative),
                           latents=self._to_pipeline_latents(noise),
                           # One generator per image for the stochastic part of the sampler (eta > 0).
                           generator=[step_generator(s, 1) for s in seeds], num_inference_steps=steps,
                           height=height, width=width, output_type="latent", **self._guidance_inputs(guidance),
                           **extra).images
        return self._from_pipeline_latents(latents, shape).float()

    def _guidance_inputs(self, guidance: float) -> dict:
        """The pipeline's keyword arguments for the guidance scale."""
        return {"guidance_scale": guidance}

    def _to_pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Samples (N, *sample_shape) as the pipeline's `latents` argument takes them (FLUX packs them)."""
        return latents

    def _from_pipeline_latents(self, latents: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The pipeline's latent output as samples of `shape` (C, H, W)."""
        return latents

    # -- attack hooks ---------------------------------------------------------------------------------
    # Besides the base's `denoise` and the schedule's `invert`: the CLIP encoders fed with input token
    # embeddings (learned tokens, adversarial prefixes), and the text embedding overridden for robust
    # erasure. Every family's denoiser takes the text sequence as its `encoder_hidden_states` argument.
    def _condition_from_text_encoders(self, outputs: list, n: int) -> Condition:
        """The condition the pipeline's `encode_prompt` makes, from the outputs (with hidden states) of
        the `CLIP_ENCODERS` run on the same tokens."""
        raise NotImplementedError

    def _clip_encoders(self) -> list[tuple[torch.nn.Module, object]]:
        return [(self.components[encoder], self.components[tokenizer]) for encoder, tokenizer in self.CLIP_ENCODERS]

    @torch.no_grad()
    def token_embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The CLIP encoders' input token embeddings of the prompts, padded to the tokenizer's length and
        side by side when there are several encoders (N, L, D1 + D2 ...), and each prompt's token count
        including its start and end tokens (N,). An attack treats the width as opaque: a learned token
        is one vector per encoder, edited together."""
        parts, counts = [], []
        for encoder, tokenizer in self._clip_encoders():
            tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            parts.append(encoder.get_input_embeddings()(tokens.input_ids.to(encoder.device)).float())
            counts.append(tokens.attention_mask.sum(1))
        if any(not torch.equal(c, counts[0]) for c in counts) or len({p.shape[1] for p in parts}) > 1:
            raise EraseError(f"the token attacks need this {self.name} model's tokenizers to split prompts alike "
                             "(the same vocabulary and length); they do not")
        return torch.cat(parts, dim=-1), counts[0]

    def encode_token_embeddings(self, embeddings: torch.Tensor) -> Condition:
        """Conditions from input token embeddings (N, L, D) as `token_embeddings` makes them: position
        embeddings and transformers are the encoders' own, and a pooled output is read at each row's
        first end token, where the tokenizer put it (the last position if an insertion pushed it out);
        differentiable in `embeddings`. Equal to `encode_conditions` on the same tokens."""
        encoders = self._clip_encoders()
        widths = [encoder.get_input_embeddings().embedding_dim for encoder, _ in encoders]
        if embeddings.ndim != 3 or embeddings.shape[-1] != sum(widths):
            raise EraseError(f"token embeddings for this model's text encoders have shape (N, L, {sum(widths)}), "
                             f"got {tuple(embeddings.shape)}")
        outputs = []
        for (encoder, tokenizer), part in zip(encoders, embeddings.split(widths, dim=-1)):
            table = encoder.get_input_embeddings()
            end = tokenizer.eos_token_id
            is_end = (part == table.weight[end].to(part)).all(-1)
            at = torch.where(is_end.any(1), is_end.int().argmax(1), part.shape[1] - 1)
            # The ids only set the shape and where CLIP pools (its first end token, or its largest id
            # under the legacy eos_token_id 2): a forward hook puts the embeddings in place of their lookup.
            ids = torch.zeros(part.shape[:2], dtype=torch.long, device=encoder.device)
            ids[torch.arange(len(ids)), at.to(encoder.device)] = end
            handle = table.register_forward_hook(lambda module, inputs, output, part=part: part.to(output.dtype))
            try:
                outputs.append(encoder(ids, output_hidden_states=True))
            finally:
                handle.remove()
        return self._condition_from_text_encoders(outputs, len(embeddings)).to(dtype=self.denoiser.dtype)

    def condition_vectors(self, cond: Condition) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each distinct text embedding (L, dim) of `cond`, as what is matched and as its vector (pooled
        embeddings and micro-conditions are left as they are)."""
        return [(row, row) for row in cond.tensors["encoder_hidden_states"].unique(dim=0)]

    @contextlib.contextmanager
    def override_condition(self, condition: torch.Tensor, replacement: torch.Tensor):
        """Inside the block, the trainable denoiser reads the text embedding `condition` (L, dim) as
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

    # -- closed-form edits ----------------------------------------------------------------------------
    def _text_segments(self) -> list[tuple[str, int | None]]:
        """(tokenizer, rows; None: the rest) of each segment of `encoder_hidden_states`, in order: the first CLIP
        tokenizer over the whole sequence (SD, SDXL: the encoders side by side on the same tokens)."""
        return [(self.CLIP_ENCODERS[0][1], self.components[self.CLIP_ENCODERS[0][1]].model_max_length)]

    @torch.no_grad()
    def text_entry_inputs(self, prompts: Sequence[str]) -> list[TextRows]:
        hidden = self.encode_conditions(list(prompts)).tensors["encoder_hidden_states"].float().cpu()
        segments, start = [], 0
        for tokenizer_name, rows in self._text_segments():
            rows = rows or hidden.shape[1] - start
            tokens = self.components[tokenizer_name](list(prompts), padding="max_length", max_length=rows,
                                                     truncation=True, return_tensors="pt")
            # The end token is the last counted one; the word before it is the prompt's last word.
            last = (tokens.attention_mask.sum(1) - 2).clamp(min=0)
            segments.append(TextRows(hidden[:, start:start + rows], last))
            start += rows
        return segments

    def pooled_text_entry(self) -> TextEntry:
        """The pooled CLIP embedding's entry (SD3, FLUX): it enters beside the timestep
        (`time_text_embed.text_embedder`), is added to the timestep embedding and modulates every block:
        on models/mini-flow it alone decides the digit drawn (BENCHMARKS section 12), so an edit of the
        token rows only misses. The empty prompt's pooled row is kept by every edit: it modulates every
        block of the unconditional prediction, which guidance subtracts from every prompt's (moving it
        by 39%, as uce did without this, cost the miniature's eight half its images)."""
        pooled = self.denoiser.time_text_embed.text_embedder.linear_1
        return TextEntry({"time_text_embed.text_embedder.linear_1": pooled}, self._pooled_rows, always_preserved=("",))

    @torch.no_grad()
    def _pooled_rows(self, prompts) -> list[TextRows]:
        pooled = self.encode_conditions(list(prompts)).tensors["pooled_projections"].float().cpu()
        return [TextRows(pooled[:, None, :], torch.zeros(len(pooled), dtype=torch.long))]  # one row, the "last word"


def _call_parameters(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)
