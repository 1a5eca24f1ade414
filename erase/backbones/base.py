"""The backbone contract: everything a method, the training loop, the evaluation or the bench may ask a model.

Code outside `erase/backbones/` talks to a model only through the members of `Backbone` below. It
never reaches for the network inside (`.unet`, `.transformer`), a scheduler, or checks what kind of
backbone it holds; what differs between model families is answered here:

- **Conditions** are `Condition` objects: named tensors that share their first (batch) dimension.
  A class id, a text embedding, and SDXL's embeddings + pooled embeddings + time ids are all just
  conditions, indexed, joined (`Condition.cat`) and moved (`.to`) the same way.
- **Training**: `draw_timesteps`, `add_noise` (DDPM noising, or flow-matching interpolation) and
  `training_target` (the noise ε, the velocity v of v-prediction, or the flow velocity ε − x0) come
  from the backbone; `predict` is the network's output in that same parameterization. The methods
  write their losses as `‖target − prediction‖²` and combine predictions linearly (classifier-free
  and negative guidance), which means the same thing in all three parameterizations.
- **Parameter groups** with meanings that hold on every backbone: `all`; `condition`, the weights
  through which the condition enters (class embedding, cross-attention, a transformer's text-side
  attention projections); `nocondition`, the rest of the network body without the time embedding and
  the output layers (ESD-u's set). Each backbone adds expert names (`xattn-kv`, `attn`, ...), and
  aliases keep older names working (`xattn` = `condition`, `noxattn` = `nocondition` on SD).
- **Sampling** (`sample`, `partial_sample`) with one seed per image and fixed-size batches, so that
  image i depends only on its condition, its seed and the batch size.

A new backbone subclasses `Backbone` (and `DDPMSchedule` or a schedule of its own), registers itself
in `erase/backbones/__init__.py`, and nothing else changes (docs/backbones.md walks through one).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Sequence

import torch
from safetensors.torch import save_file

from ..resources import SHIPPED_MODELS
from ..suggest import FILE_SUFFIXES, did_you_mean, near_path
from ..utils import EraseError, progress_off, read_json, step_generator

# First batch `choose_batch_size` tries on a GPU (halved until it fits): with guidance the UNet runs
# 128 samples per call, past where GPUs stop gaining throughput (not yet measured on one here).
GPU_BATCH_START = 64


class Condition:
    """Named tensors with one row per sample: what the denoiser is conditioned on.

    `cond[i]`, `cond[idx_tensor]` and `cond[a:b]` select rows (an int keeps the batch dimension);
    `Condition.cat` joins conditions row-wise; `.to(device, dtype)` moves every tensor and casts the
    floating ones (class ids stay integers). The names are the denoiser's keyword inputs.
    """

    __slots__ = ("tensors",)

    def __init__(self, **tensors: torch.Tensor):
        if not tensors:
            raise EraseError("a condition needs at least one tensor")
        sizes = {name: len(t) for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise EraseError(f"the tensors of a condition must have one row per sample, got {sizes}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index) -> "Condition":
        if isinstance(index, str):
            raise TypeError("use cond.tensors[name] for one tensor of a condition")
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Condition(**{name: t[index] for name, t in self.tensors.items()})

    @staticmethod
    def cat(conditions: Sequence["Condition"]) -> "Condition":
        names = list(conditions[0].tensors)
        if any(list(c.tensors) != names for c in conditions):
            raise EraseError("conditions of different kinds cannot be joined")
        return Condition(**{n: torch.cat([c.tensors[n] for c in conditions]) for n in names})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Condition":
        return Condition(**{n: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
                            for n, t in self.tensors.items()})

    def equal(self, other: "Condition") -> bool:
        return list(self.tensors) == list(other.tensors) and all(
            torch.equal(t, other.tensors[n]) for n, t in self.tensors.items())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def __repr__(self) -> str:
        return "Condition(" + ", ".join(f"{n}={tuple(t.shape)}" for n, t in self.tensors.items()) + ")"


class WithWeights:
    """The denoiser called with some parameters replaced by tensors (e.g. LUR's look-ahead weights θ')."""

    def __init__(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]):
        self.module, self.weights = module, weights

    def __call__(self, *args, **kwargs):
        from torch.func import functional_call

        return functional_call(self.module, self.weights, args, kwargs)


class Backbone:
    """Base class of every backbone. Subclasses set the class attributes and write the abstract members.

    Class attributes:
      `name`: the registry key, written into saved models.
      `condition_kind`: "class" (conditions are class ids or names) or "text" (prompts).
      `PARAMETER_GROUPS`: group name -> predicate on the denoiser's parameter names; must hold `all`,
        `condition` and `nocondition`. `GROUP_ALIASES`: older names -> a group.
      `SAMPLE_DEFAULTS`: steps, guidance and eta to sample with when nothing else is recorded.
    """

    name: ClassVar[str] = ""
    condition_kind: ClassVar[str] = ""
    PARAMETER_GROUPS: ClassVar[dict[str, Callable[[str], bool]]] = {}
    GROUP_ALIASES: ClassVar[dict[str, str]] = {}
    SAMPLE_DEFAULTS: ClassVar[dict] = {"steps": 50, "guidance": 7.5, "eta": 0.0}

    info: dict  # provenance and recorded settings, saved with the model

    # -- loading (the registry in __init__ probes each backbone in turn) -----------------------------
    @classmethod
    def accepts(cls, source) -> bool:
        """Whether this backbone loads `source` (a `ModelSource`), decided without loading weights."""
        raise NotImplementedError

    #: what `accepts` looks for, for the error that lists what was tried
    accepts_description: ClassVar[str] = ""

    @classmethod
    def from_source(cls, source, **kwargs) -> "Backbone":
        raise NotImplementedError

    def save_pretrained(self, path: str | Path, **info) -> None:
        """Write the model atomically as a folder `load_backbone` (and, for pipelines, stock diffusers) loads."""
        raise NotImplementedError

    # -- the network and its weights ------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The trainable network (a UNet or a transformer). Only backbone code calls it directly."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Backbone":
        """Move the networks to `device`, and cast them to `dtype` when one is given."""
        self.denoiser.to(device, dtype)
        return self

    def parameter_groups(self) -> list[str]:
        """Every group name `trainable_parameters` accepts (semantic, expert, then aliases)."""
        return list(self.PARAMETER_GROUPS) + list(self.GROUP_ALIASES)

    def trainable_parameters(self, group: str = "all") -> dict[str, torch.nn.Parameter]:
        """The denoiser's parameters of `group`, by name (as in the denoiser's `state_dict()`)."""
        keep = self.PARAMETER_GROUPS.get(self.GROUP_ALIASES.get(group, group))
        if keep is None:
            raise EraseError(f"parameter group {group!r} does not exist for the {self.name} backbone; "
                             f"choose one of {', '.join(self.parameter_groups())}")
        params = {n: p for n, p in self.denoiser.named_parameters() if keep(n)}
        if not params:
            raise EraseError(f"parameter group {group!r} is empty for this {self.name} model (its network "
                             "lacks those layers); choose another group")
        return params

    def frozen_copy(self) -> torch.nn.Module:
        """A frozen copy of the current denoiser: the reference model of the methods (pass it as `denoiser=`)."""
        ref = copy.deepcopy(self.denoiser).eval()
        ref.requires_grad_(False)
        return ref

    def with_weights(self, weights: dict[str, torch.Tensor]) -> WithWeights:
        """The denoiser with the named parameters replaced by `weights` (pass it as `denoiser=`)."""
        return WithWeights(self.denoiser, weights)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's activations in the backward pass (less memory, slower steps)."""
        self.denoiser.enable_gradient_checkpointing()

    def fingerprint(self) -> str:
        """A hash of a strided sample of every denoiser weight: tells models apart without hashing gigabytes."""
        h = hashlib.sha256()
        for name, p in self.denoiser.state_dict().items():
            flat = p.detach().flatten()
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def save_delta(self, path: str | Path, tensors: dict[str, torch.Tensor], **metadata: str) -> None:
        """Denoiser tensors (a subset of its state dict) as one safetensors file, written atomically.

        Stock diffusers applies it with `pipe.<denoiser>.load_state_dict(load_file(path), strict=False)`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp),
                  metadata={"format": f"{self.delta_module} state_dict subset (load with strict=False)", **metadata})
        os.replace(tmp, path)  # a reader never sees half a file

    #: the pipeline attribute the delta applies to (`unet`, `transformer`)
    delta_module: ClassVar[str] = "unet"

    #: the `erase export` formats whose converters cover this backbone (`erase.export`)
    EXPORT_FORMATS: ClassVar[tuple[str, ...]] = ()

    def single_file_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight in the family's original single-file layout (`erase export --format single-file`)."""
        raise EraseError(f"no single-file layout is known for the {self.name} backbone")

    # -- conditions ---------------------------------------------------------------------------------
    def encode_conditions(self, items: Iterable) -> Condition:
        """Conditions for class ids/names (class backbones) or prompts (text backbones), on `device`."""
        raise NotImplementedError

    def null_condition(self, n: int) -> Condition:
        """The unconditional input of classifier-free guidance (null class, empty prompt), n rows."""
        raise NotImplementedError

    # -- training: timesteps, noising, target, prediction ---------------------------------------------
    @property
    def prediction_type(self) -> str:
        """`epsilon`, `v_prediction` or `flow` (velocity ε − x0): what `predict` returns and `training_target` is."""
        raise NotImplementedError

    def draw_timesteps(self, n: int, g: torch.Generator, antithetic: bool = False) -> torch.Tensor:
        """n training timesteps from `g` (on the CPU), as the denoiser takes them; `antithetic` pairs
        each with its mirror (t and T-1-t), as SA and SalUn do, to lower the variance."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: the clean samples noised to timesteps t."""
        raise NotImplementedError

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What `predict` should output on `add_noise(x0, noise, t)`."""
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition, denoiser=None) -> torch.Tensor:
        """The network's prediction (in `prediction_type`) from the trainable denoiser, or from
        `denoiser` (a `frozen_copy` or `with_weights`)."""
        return self._forward(denoiser or self.denoiser, x_t, t, cond)

    def _forward(self, denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        raise NotImplementedError

    def guided_prediction(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition, guidance: float,
                          denoiser=None) -> torch.Tensor:
        """Classifier-free guidance `p_∅ + s·(p_c − p_∅)`: both halves in one batched forward."""
        t = t.expand(len(x_t)) if t.dim() == 0 else t  # a sampler's scalar timestep, one per sample
        if guidance == 1.0:
            return self.predict(x_t, t, cond, denoiser)
        both = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]),
                            Condition.cat([cond, self.null_condition(len(cond))]), denoiser)
        p_c, p_u = both.chunk(2)
        return p_u + guidance * (p_c - p_u)

    # -- sampling -------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample the denoiser works on (pixels, or latents), at the native resolution."""
        raise NotImplementedError

    @property
    def sample_defaults(self) -> dict:
        """Steps, guidance and eta when the user gives none: the model's recorded values
        (`info.sample_defaults`, e.g. a shipped model's measured guidance), else `SAMPLE_DEFAULTS`."""
        recorded = self.info.get("sample_defaults", {})
        return {k: recorded.get(k, v) for k, v in self.SAMPLE_DEFAULTS.items()}

    def initial_noise(self, seeds: Sequence[int], raw_seeds: bool = False,
                      shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """x_T for each seed, drawn on the CPU so that it does not depend on device or batch.

        `raw_seeds` seeds each image's generator with the seed as given, as a stock diffusers call with
        one CPU generator per image does (so a dataset's recorded seeds mean what they meant to its
        authors); otherwise the seed is mixed first (`step_generator`), so nearby seeds are unrelated.
        """
        shape = shape or self.sample_shape
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s) if raw_seeds
                                        else step_generator(s)) for s in seeds])

    def sampling_scheduler(self, steps: int):
        """A fresh scheduler of the backbone's sampler with `steps` timesteps set."""
        raise NotImplementedError

    @torch.no_grad()
    def partial_sample(self, cond: Condition, g: torch.Generator, steps: int, stop: int,
                       guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """ESD's `x_t`: sample the current model on `cond` (guided) from fresh noise for `stop` of
        `steps` sampler steps; returns x_t and its timestep per sample (as `draw_timesteps` gives them)."""
        n = len(cond)
        sampler = self.sampling_scheduler(steps)
        x = self.initial_noise(torch.randint(2**62, (n,), generator=g).tolist()).to(self.device)
        for t in sampler.timesteps[:stop]:
            x = sampler.step(self.guided_prediction(x, t.to(self.device).expand(n), cond, guidance), t, x).prev_sample
        return x, sampler.timesteps[stop].to(self.device).expand(n)

    def _sampler_walk(self, initial: torch.Tensor, cond: Condition, steps: int, guidance: float, denoiser=None):
        """The deterministic sampler (eta 0) from `initial` noise under `cond`, guided by `guidance`
        against the null condition, one step at a time: yields (x_t, t) before each step, then
        (final samples, None)."""
        sampler = self.sampling_scheduler(steps)
        # DDIM starts from unit noise times its init_noise_sigma; flow-matching Euler from the noise itself.
        x = initial.to(self.device, self.denoiser.dtype) * getattr(sampler, "init_noise_sigma", 1.0)
        for t in sampler.timesteps:
            yield x, t
            x = sampler.step(self.guided_prediction(x, t.to(self.device), cond, guidance, denoiser), t, x).prev_sample
        yield x, None

    @torch.no_grad()
    def sampling_path(self, initial: torch.Tensor, cond: Condition, steps: int, guidance: float,
                      denoiser=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The states the deterministic sampler feeds the denoiser on its way from `initial` noise under
        `cond` (guided by `guidance`), with `denoiser` (a frozen copy) or the trainable one: states
        (steps, N, *sample_shape) and their timesteps (steps, N), as `predict` takes them. The walk
        `denoise` takes, keeping the inputs instead of the end."""
        states, times = zip(*[(x, t.to(self.device).expand(len(x)))
                              for x, t in self._sampler_walk(initial, cond, steps, guidance, denoiser) if t is not None])
        return torch.stack(states), torch.stack(times)

    @torch.inference_mode()
    def sample(self, conditions: Sequence, seeds: Sequence[int], steps: int = 50, guidance: float = 7.5,
               eta: float = 0.0, batch_size: int = 8, progress: bool = False, return_latents: bool = False,
               raw_seeds: bool = False, **options) -> torch.Tensor:
        """Images in [-1, 1] (N, C, H, W) on the CPU, one per (condition, seed).

        `conditions` are class ids/names or prompts. Guidance is the scale `s` of `p_∅ + s·(p_c − p_∅)`
        (1 is plain conditional sampling). Image i depends only on (conditions[i], seeds[i]) and
        `batch_size`: not on how many images are requested, their order, or the process that makes
        them. The network always runs on exactly `batch_size` samples (the last chunk is padded),
        because CPU and GPU kernels round differently for different batch shapes but identically for
        the same shape. `return_latents`: the final samples before decoding (latent backbones).
        `options` are backbone-specific (text backbones: `height`, `width`, `negative_prompt`,
        `scheduler="shipped"` for the pipeline's own sampler).
        """
        if len(conditions) != len(seeds):
            raise EraseError(f"{len(conditions)} conditions but {len(seeds)} seeds: give one seed per image")
        if steps < 1:
            raise EraseError(f"steps must be at least 1, got {steps}")
        if batch_size < 1:
            raise EraseError(f"batch_size must be at least 1, got {batch_size}")
        out = []
        chunks = range(0, len(seeds), batch_size)
        if progress and not progress_off():
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc="sampling", unit="batch")
        self.denoiser.eval()
        for start in chunks:
            chunk = list(conditions[start:start + batch_size])
            chunk_seeds = list(seeds[start:start + batch_size])
            n = len(chunk_seeds)
            pad = batch_size - n
            samples = self._sample_batch(chunk + chunk[-1:] * pad, chunk_seeds + chunk_seeds[-1:] * pad, steps,
                                         guidance, eta, raw_seeds, **options)
            # Decoded at the full batch size too, for the same reason as the sampling itself.
            out.append((samples if return_latents else self.decode(samples))[:n].float().cpu())
        if not out:
            return torch.empty(0, *(self.sample_shape if return_latents else self.image_shape))
        return torch.cat(out)

    def _sample_batch(self, conditions: list, seeds: list[int], steps: int, guidance: float, eta: float,
                      raw_seeds: bool, **options) -> torch.Tensor:
        """Final samples (before `decode`) of exactly one batch."""
        raise NotImplementedError

    def choose_batch_size(self, condition, cpu_batch: int, state=None, **options) -> int:
        """The batch a protocol samples at when the user gives none: `cpu_batch` on a CPU (where
        running out of memory kills the process rather than raising an error, so nothing can be
        probed); on a GPU the largest that fits (`fit_batch_size` from `GPU_BATCH_START`), the
        smallest any process found, so that every shard rounds alike. Record the result: images
        depend on it through rounding."""
        if self.device.type == "cpu":
            return cpu_batch
        batch = self.fit_batch_size(condition, GPU_BATCH_START, **options)
        if state is not None and state.num_processes > 1:
            from accelerate.utils import gather_object

            batch = min(gather_object([batch]))
        return batch

    @torch.inference_mode()
    def fit_batch_size(self, condition, start: int, **options) -> int:
        """The largest batch, halving from `start`, at which one guided sampler step (guidance doubles
        the network's batch) and the decoder run without running out of memory; accelerate's
        `find_executable_batch_size` retries. A step's peak memory does not grow with the number of
        steps, so one step tells."""
        from accelerate.utils import find_executable_batch_size

        size = start

        def halve() -> int:
            nonlocal size
            size //= 2
            return size

        @find_executable_batch_size(starting_batch_size=start, reduce_batch_size_fn=halve)
        def probe(batch_size: int) -> int:
            self.denoiser.eval()
            self.decode(self._sample_batch([condition] * batch_size, list(range(batch_size)), 1, 2.0, 0.0,
                                           False, **options))
            return batch_size

        try:
            return probe()
        except RuntimeError as e:
            if "reached zero" in str(e):
                raise EraseError(f"even one image of {self.name} does not fit in {self.device}'s memory: free "
                                 "memory, or sample on a larger device") from e
            raise

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Final samples to images in [-1, 1] (pixel backbones: a clamp)."""
        return samples.float().clamp(-1, 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of a generated image at the native resolution."""
        return tuple(self.sample_shape)

    # -- attack hooks ---------------------------------------------------------------------------------
    # What the attacks of `erase.eval.attacks` and robust erasure (`erase.robust`) need beyond
    # sampling. None of them changes a weight; a condition is overridden only inside a `with` block.
    def denoise(self, initial: torch.Tensor, cond: Condition, steps: int, guidance: float) -> torch.Tensor:
        """Final samples (before `decode`) of the deterministic sampler (eta 0) from `initial` noise under
        `cond`, guided by `guidance` against the null condition: the computation of
        `sample(..., return_latents=True)` written out so that gradients can flow to `initial` and to
        the condition. Run it under `torch.no_grad()` to sample."""
        *_, (final, _) = self._sampler_walk(initial, cond, steps, guidance)
        return final

    def condition_vectors(self, cond: Condition) -> list[tuple[object, torch.Tensor]]:
        """(what `override_condition` matches, the condition's vector) per distinct condition of `cond`:
        the continuous input an adversary perturbs."""
        raise EraseError(f"the {self.name} backbone has no condition override, which adversarial attacks "
                         "and robust erasure need")

    def override_condition(self, match, vector: torch.Tensor):
        """A context manager: inside it the trainable denoiser reads condition `match` (from
        `condition_vectors`) as `vector`, differentiably; frozen copies and the weights are untouched."""
        raise EraseError(f"the {self.name} backbone has no condition override, which adversarial attacks "
                         "and robust erasure need")

    def token_embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text backbones: the text encoders' input token embeddings (N, L, D) and token counts (N,)."""
        raise EraseError(f"the {self.name} backbone has no text encoder whose token embeddings the token "
                         "attacks could edit")

    def encode_token_embeddings(self, embeddings: torch.Tensor) -> Condition:
        """Conditions from input token embeddings (see `token_embeddings`)."""
        raise EraseError(f"the {self.name} backbone has no text encoder whose token embeddings the token "
                         "attacks could edit")

    # -- closed-form edits ----------------------------------------------------------------------------
    # What UCE-style edits (erase/edits/) need: the linear maps that read the text embedding, and the
    # rows of that embedding a prompt feeds them. Text enters such a map row by row (one token each),
    # so an edit is a least-squares problem on rows: no image, no training loop.
    def text_entry_layers(self) -> dict[str, torch.nn.Linear]:
        """The denoiser's linear maps that read the text embedding directly, by module name (their
        weights are `<name>.weight` in the denoiser's state dict): cross-attention keys and values on
        UNets, the text stream's entry on transformers."""
        raise EraseError(f"the {self.name} backbone has no layers where a text embedding enters the denoiser "
                         "(cross-attention keys and values), which closed-form edits rewrite: erase with a "
                         "fine-tuning method instead (`erase methods`)")

    def text_entry_inputs(self, prompts: Sequence[str]) -> list["TextRows"]:
        """What the `text_entry_layers` read for each prompt: one `TextRows` per segment of the text
        sequence (a segment per tokenizer whose states are laid end to end; one on SD and SDXL)."""
        raise EraseError(f"the {self.name} backbone has no layers where a text embedding enters the denoiser "
                         "(cross-attention keys and values), which closed-form edits rewrite: erase with a "
                         "fine-tuning method instead (`erase methods`)")

    def text_entries(self) -> dict[str, "TextEntry"]:
        """Every place where text enters the denoiser through linear maps, by name: the layers of one
        entry read the same rows, so an edit solves once per entry. `tokens` (the `text_entry_layers`
        on the `text_entry_inputs`) on every text backbone; a backbone adds others where a separate
        text vector enters (SD3 and FLUX: the pooled CLIP embedding, `pooled`)."""
        return {"tokens": TextEntry(self.text_entry_layers(), self.text_entry_inputs)}


@dataclass
class TextRows:
    """One segment of the text embeddings that prompts feed the text-entry layers.

    `embeddings` (N, L, D): every row the denoiser reads, padding included: CLIP encodes causally, so
    the end token and the padding after it carry the whole prompt and are read as much as the words.
    `last_token` (N,): the position of each prompt's last word, the row before its end token (0, the
    start token, for an empty prompt). UCE maps a concept's rows from its last word to the end of the
    sequence, aligned at that word with the anchor's rows; the rows before it (the start token, and
    words such as "a photo of") are shared with other prompts and stay as they are.
    """

    embeddings: torch.Tensor
    last_token: torch.Tensor


@dataclass
class TextEntry:
    """Linear maps of the denoiser (by module name) that all read the rows `inputs(prompts)` gives, and
    the prompts whose rows an edit of them must keep whatever the retain set (`always_preserved`)."""

    layers: dict[str, torch.nn.Linear]
    inputs: Callable[[Sequence[str]], list[TextRows]]
    always_preserved: tuple[str, ...] = ()


def uniform_indices(T: int, n: int, g: torch.Generator, antithetic: bool = False) -> torch.Tensor:
    """n draws of U{0..T-1} from `g`; `antithetic` pairs each draw k with T-1-k inside the batch."""
    if antithetic:
        half = torch.randint(T, ((n + 1) // 2,), generator=g)
        return torch.cat([half, T - 1 - half])[:n]
    return torch.randint(T, (n,), generator=g)


class DDPMSchedule:
    """Training and sampling on a DDPM noise schedule (`self.scheduler`, a DDPMScheduler), for a
    denoiser that predicts ε or v (the scheduler config's `prediction_type`). Sampling is DDIM."""

    scheduler = None  # a diffusers DDPMScheduler, set by the backbone

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def draw_timesteps(self, n: int, g: torch.Generator, antithetic: bool = False) -> torch.Tensor:
        return uniform_indices(self.num_train_timesteps, n, g, antithetic)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        if kind == "sample":
            return x0
        raise EraseError(f"prediction type {kind!r} of this model's scheduler is not supported "
                         "(epsilon, v_prediction or sample)")

    def sampling_scheduler(self, steps: int):
        from diffusers import DDIMScheduler

        sampler = DDIMScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(steps)
        if sampler.config.clip_sample:
            # With x0 clipped to [-1, 1], step with the ε that the clipped x0 implies (DDIM's update
            # made consistent), not diffusers' default of the raw ε: under guidance the raw ε points
            # off the data and the samples degrade. Measured on the digits DDPM shipped with erase 0.1.0
            # (20 per digit, 50 steps, guidance 3): 37.5% of the asked digits drawn with the raw ε,
            # 100% with this (CHANGELOG.md).
            sampler.step = functools.partial(sampler.step, use_clipped_model_output=True)
        return sampler

    def invert(self, samples: torch.Tensor, cond: Condition, steps: int) -> torch.Tensor:
        """DDIM inversion (an attack hook): the initial noise from which `denoise(..., cond, steps,
        guidance=1)` returns approximately `samples` (final samples, e.g. an image's `encode_images`)."""
        from diffusers import DDIMInverseScheduler

        sampler = DDIMInverseScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(steps)
        x = samples.to(self.device, self.denoiser.dtype)
        for t in sampler.timesteps:
            x = sampler.step(self.predict(x, t.to(self.device), cond), t, x).prev_sample
        return x


class FlowMatchingSchedule:
    """Training and sampling by flow matching (rectified flow, SD3 / FLUX): `x_t = (1 − σ)·x0 + σ·ε`,
    the denoiser predicts the velocity `ε − x0`, and sampling integrates it with Euler steps.

    `self.scheduler` is a FlowMatchEulerDiscreteScheduler; its timesteps are `σ·T` with the model's
    shift applied, and training draws one of those T timesteps uniformly (antithetic: index k and
    T-1-k), so training sees the same σ spacing the sampler walks through.
    """

    scheduler = None  # a diffusers FlowMatchEulerDiscreteScheduler, set by the backbone

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def draw_timesteps(self, n: int, g: torch.Generator, antithetic: bool = False) -> torch.Tensor:
        index = uniform_indices(self.num_train_timesteps, n, g, antithetic)
        # A fresh scheduler's timesteps are the full training table, σ = 1 (noise) first.
        table = type(self.scheduler).from_config(self.scheduler.config).timesteps
        return table[index].float()

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = (t.float() / self.num_train_timesteps).to(like.device)
        return sigma.reshape(-1, *[1] * (like.dim() - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(t, x0)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def sampling_scheduler(self, steps: int):
        sampler = type(self.scheduler).from_config(self.scheduler.config)
        sampler.set_timesteps(steps)
        return sampler

    def invert(self, samples: torch.Tensor, cond: Condition, steps: int) -> torch.Tensor:
        """Euler inversion (an attack hook): the sampler's σ grid walked from the samples (σ = 0) back to
        noise (σ = 1), each step using the velocity at the point it starts from, so that
        `denoise(..., cond, steps, guidance=1)` returns approximately `samples`."""
        sigmas = self.sampling_scheduler(steps).sigmas.tolist()  # descending, ends with 0
        x = samples.to(self.device, self.denoiser.dtype)
        for i in range(steps - 1, -1, -1):
            low, high = sigmas[i + 1], sigmas[i]
            t = torch.full((len(x),), low * self.num_train_timesteps, device=self.device)
            # Unguided, as `denoise(..., guidance=1)` walks (on a guidance-distilled model that is
            # the guidance embedding at 1, not the training guidance `predict` uses).
            x = x + (high - low) * self.guided_prediction(x, t, cond, 1.0)
        return x


@dataclass
class ModelSource:
    """What the user passed as a model, looked at once so that every backbone can probe it cheaply.

    `kind`: `folder`, `file` or `hub`. `index`: the diffusers `model_index.json` of a pipeline folder
    or Hub repository (read from the local Hugging Face cache when offline). `keys`: tensor names of
    a single checkpoint file (no tensor is read).
    """

    text: str
    kind: str
    path: Path | None = None
    index: dict | None = None
    keys: frozenset[str] = frozenset()

    @property
    def pipeline_class(self) -> str | None:
        return (self.index or {}).get("_class_name")

    def has_key_prefix(self, *prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in self.keys)

    @classmethod
    def resolve(cls, source: str | Path) -> "ModelSource":
        text = str(source)
        path = Path(source).expanduser()
        if path.is_dir():
            index = path / "model_index.json"
            return cls(text, "folder", path, read_json(index, what="diffusers pipeline index") if index.is_file() else None)
        if path.is_file():
            return cls(text, "file", path, keys=frozenset(checkpoint_keys(path)))
        if looks_like_hub_id(text):
            return cls(text, "hub", index=hub_model_index(text))
        raise EraseError(f"model {text} does not exist{near_path(path) or did_you_mean(text, SHIPPED_MODELS)} "
                         f"(expected a model folder, a .safetensors/.ckpt file, a shipped model: "
                         f"{', '.join(SHIPPED_MODELS)}, or a Hub id such as CompVis/stable-diffusion-v1-4)")


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a single-file checkpoint (.safetensors: from its header; .ckpt: tensors only,
    read with torch.load(weights_only=True), so no code runs)."""
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise EraseError(f"{path} is a file but not a checkpoint: expected {' or '.join(SINGLE_FILE_SUFFIXES)}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return list(state.get("state_dict", state))


def looks_like_hub_id(text: str) -> bool:
    """`owner/name`, and not a local path: no leading `.`/`/`/`~`, no file suffix, and no local folder
    named `owner` (a typo of a model under an existing `models/` folder is a local path, not a Hub
    repository)."""
    owner, _, name = text.partition("/")
    return (text.count("/") == 1 and bool(owner) and bool(name) and not text.startswith((".", "~"))
            and not text.lower().endswith(FILE_SUFFIXES) and not Path(owner).expanduser().exists())


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_model_index(repo_id: str) -> dict:
    """The `model_index.json` of a Hub repository: from the local cache (HF_HOME) or, online, the Hub.
    Offline (HF_HUB_OFFLINE=1) only the cache is read, so a model that is not there is refused at once."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if hub_offline():
        cached = try_to_load_from_cache(repo_id, "model_index.json")
        if not isinstance(cached, str):
            raise EraseError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download "
                             "it while online (huggingface-cli download), or give a local model folder")
        return read_json(Path(cached), what="diffusers pipeline index")
    try:
        return read_json(Path(hf_hub_download(repo_id, "model_index.json")), what="diffusers pipeline index")
    except EraseError:
        raise
    except Exception as e:  # offline without a cached copy, unknown repository, no model_index.json
        raise EraseError(f"could not read model_index.json of the Hub model {repo_id} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); check the id, or download it while online "
                         "(huggingface-cli download) so that it is in the local cache") from None
