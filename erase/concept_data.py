"""Training data for text concepts: images the original model draws from the concept's prompts.

SalUn and EUPMU erase nudity with 800 images generated from the forget prompt and 800 from the
anchor prompt; the methods here follow that recipe for any concept (`erase/concepts.py`). The images
are generated once, with a recorded seed per image, and cached as the VAE latents the methods train
on, next to the text embeddings of every prompt and a JSON manifest (model, prompts, seeds, sampler
settings, package versions). Every method and every run with the same model, concept and settings
reuses the cache.

The cached latents are the sampler's final latents (what the VAE would decode), so no image is
ever quantised to 8 bits and re-encoded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbones.base import Condition
from .concepts import Concept
from .config import config_dict, field
from .unlearn_data import UnlearnData
from .utils import EraseError, atomic_dir, derive_seed, logger, package_versions, read_json, safe_name, warn_if_costly, write_json

MANIFEST = "manifest.json"
LATENTS = "latents.safetensors"
EMBEDDINGS = "embeddings.safetensors"
CACHE_VERSION = 2  # 2: conditions stored as named tensors (SDXL, SD3 have several)
SETS = ("forget", "anchor", "retain")  # the seed of image i of set s is derive_seed(seed, s, i)
SHARD_BATCHES = 8  # batches per file of the work folder: what an interrupt can lose


@dataclass
class ConceptDataConfig:
    images: int = field(800, "images generated per set (forget, anchor, retain); SalUn and EUPMU use 800")
    steps: int | None = field(None, "sampling steps (default: the model's sample_defaults, else 50)")
    guidance: float | None = field(None, "classifier-free guidance scale (default: the model's, else 7.5)")
    batch_size: int = field(8, "images per pipeline call (fixed, so that every image is reproducible)")
    seed: int = field(0, "image i of set s gets the seed derive_seed(seed, s, i)")
    anchor_in_retain: bool = field(True, "add the anchor images to the retain set (SalUn's nudity recipe: "
                                         "images of 'a person wearing clothes' are the retain data)")

    def __post_init__(self):
        if self.images < 1 or self.batch_size < 1:
            raise ValueError("images and batch_size must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def default_cache_root() -> Path:
    return Path(os.environ.get("ERASE_CACHE", Path.home() / ".cache" / "erase")).expanduser() / "concepts"


def _plan(concept: Concept, config: ConceptDataConfig) -> dict[str, list[tuple[str, int]]]:
    """(prompt, seed) of every image, per set; prompts cycle through the set's list."""
    prompts = {"forget": concept.forget, "anchor": [concept.anchor], "retain": concept.retain}
    return {name: [(prompts[name][i % len(prompts[name])], derive_seed(config.seed, s, i))
                   for i in range(config.images)]
            for s, name in enumerate(SETS)}


def _settings(model, concept: Concept, config: ConceptDataConfig) -> dict:
    defaults = model.sample_defaults
    return {
        "cache_version": CACHE_VERSION,
        "model": model.info.get("source", "in-memory model"),
        "backbone": model.name,
        "denoiser_fingerprint": model.fingerprint(),
        "concept": concept.as_dict(),
        "images": config.images,
        "steps": config.steps or defaults["steps"],
        "guidance": config.guidance if config.guidance is not None else defaults["guidance"],
        "batch_size": config.batch_size,
        "seed": config.seed,
    }


def _key(settings: dict) -> dict:
    """The settings that decide the images: the model's path is left out (its fingerprint is in)."""
    return {k: v for k, v in settings.items() if k != "model"}


def cache_dir_for(settings: dict, root: str | Path | None = None) -> Path:
    """`<root>/<concept>-<hash of the settings>`: the same settings always find the same folder."""
    digest = hashlib.sha256(repr(sorted(_key(settings).items())).encode()).hexdigest()[:12]
    return Path(root or default_cache_root()) / f"{safe_name(settings['concept']['name'])}-{digest}"


def generate_concept_cache(model, concept: Concept, config: ConceptDataConfig | None = None,
                           cache_root: str | Path | None = None, progress: bool = True) -> Path:
    """Generate (or find) the cached latents and embeddings of `concept`; returns the cache folder."""
    from filelock import FileLock

    config = config or ConceptDataConfig()
    settings = _settings(model, concept, config)
    folder = cache_dir_for(settings, cache_root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One builder per cache folder: runs started side by side on the same concept (two jobs, or the
    # processes of one accelerate run) wait here, then find the folder the first one wrote.
    with FileLock(folder.with_name(f".{folder.name}.lock")):
        return _find_or_generate(model, concept, config, settings, folder, progress)


def _find_or_generate(model, concept: Concept, config: ConceptDataConfig, settings: dict, folder: Path,
                      progress: bool) -> Path:
    if (folder / MANIFEST).is_file():
        manifest = read_json(folder / MANIFEST, what="concept cache manifest")
        if _key(manifest.get("settings", {})) == _key(settings):
            logger.info("reusing cached concept data %s", folder)
            return folder
        raise EraseError(f"{folder} holds concept data made with other settings; delete it to regenerate")

    plan = _plan(concept, config)
    warn_if_costly("unlearn (concept images)", len(SETS) * config.images, settings["steps"])
    # Every shard of SHARD_BATCHES batches is kept in a work folder as it is made, so an interrupted
    # run (800 SD images a set take minutes on a GPU) keeps the images made so far and resumes at the
    # shard it was generating. Shards end on batch boundaries: the images are those of one pass.
    work = folder.with_name(f".{folder.name}.partial")
    work.mkdir(parents=True, exist_ok=True)
    if (work / "settings.json").is_file() and _key(read_json(work / "settings.json")) != _key(settings):
        shutil.rmtree(work)
        work.mkdir()
    write_json(work / "settings.json", settings)
    latents = {}
    for name in SETS:
        prompts, seeds = zip(*plan[name])
        logger.info("generating %d %s images (%s)", len(seeds), name, ", ".join(dict.fromkeys(prompts))[:120])
        latents[name] = torch.cat([_shard(model, work, name, k, prompts, seeds, settings, config, progress)
                                   for k in range(0, len(seeds), SHARD_BATCHES * config.batch_size)]).contiguous()
    distinct = list(dict.fromkeys([""] + concept.forget + [concept.anchor] + concept.retain))
    conditions = model.encode_conditions(distinct).to("cpu", torch.float32)
    with atomic_dir(folder) as tmp:
        save_file(latents, tmp / LATENTS)
        save_file({name: t.contiguous() for name, t in conditions.tensors.items()}, tmp / EMBEDDINGS)
        write_json(tmp / MANIFEST, {
            "settings": settings,
            "config": config_dict(config),
            "embedding_prompts": distinct,
            "images": {name: [{"prompt": p, "seed": s} for p, s in plan[name]] for name in SETS},
            "versions": package_versions(),
        })
    shutil.rmtree(work, ignore_errors=True)
    logger.info("cached concept data in %s", folder)
    return folder


def _shard(model, work: Path, name: str, start: int, prompts, seeds, settings: dict, config: ConceptDataConfig,
           progress: bool) -> torch.Tensor:
    """The latents of images start.. of set `name`: read from the work folder, or generated and saved there."""
    done = work / f"{name}-{start:06d}.safetensors"
    if done.is_file():
        return load_file(done)["latents"]
    end = start + SHARD_BATCHES * config.batch_size
    latents = model.sample(list(prompts[start:end]), list(seeds[start:end]), steps=settings["steps"],
                           guidance=settings["guidance"], batch_size=config.batch_size,
                           progress=progress, return_latents=True).contiguous()
    save_file({"latents": latents}, str(work / f".{done.name}.tmp"))
    os.replace(work / f".{done.name}.tmp", done)
    return latents


def load_concept_cache(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Condition], dict]:
    """(latents per set, condition per prompt, manifest) of a cache folder."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, what="concept cache manifest")
    for f in (LATENTS, EMBEDDINGS):
        if not (folder / f).is_file():
            raise EraseError(f"concept cache {folder} lacks {f}: delete the folder to regenerate it")
    latents = load_file(folder / LATENTS)
    table = Condition(**load_file(folder / EMBEDDINGS))
    conditions = {p: table[i] for i, p in enumerate(manifest["embedding_prompts"])}
    return latents, conditions, manifest


def concept_unlearn_data(model, concept: Concept, config: ConceptDataConfig | None = None,
                         cache_root: str | Path | None = None, progress: bool = True) -> UnlearnData:
    """The engine's data object for a text concept, from the cache (generated on first use)."""
    config = config or ConceptDataConfig()
    folder = generate_concept_cache(model, concept, config, cache_root, progress)
    latents, emb, manifest = load_concept_cache(folder)
    images = manifest["images"]

    def conds(name: str) -> Condition:
        return Condition.cat([emb[item["prompt"]] for item in images[name]])

    retain_x0, retain_cond = latents["retain"], conds("retain")
    if config.anchor_in_retain:
        retain_x0 = torch.cat([latents["anchor"], retain_x0])
        retain_cond = Condition.cat([conds("anchor"), retain_cond])
    forget_cond = conds("forget")
    anchor_cond = emb[concept.anchor][[0] * len(forget_cond)]
    return UnlearnData(
        forget_x0=latents["forget"], forget_cond=forget_cond, anchor_cond=anchor_cond,
        retain_x0=retain_x0, retain_cond=retain_cond,
        description={"kind": "concept", "concept": concept.as_dict(), "cache": str(folder),
                     "forget_images": len(latents["forget"]), "retain_images": len(retain_x0),
                     "anchor_in_retain": config.anchor_in_retain, "steps": manifest["settings"]["steps"],
                     "guidance": manifest["settings"]["guidance"], "seed": config.seed})
