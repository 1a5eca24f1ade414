"""Building a run's forget/retain sets, and drawing each step's batch from them.

Which sets a request means depends on the kind of model: a class-conditional model erases classes
from its dataset's real images (`erase.unlearn_data.class_erasure_data`), a text-to-image model
erases a concept from images it generates from the concept's prompts (`erase.concept_data`). This
used to be a method of the backbones; it lives here so that the backbones import nothing above them.
"""

from __future__ import annotations

import dataclasses

import torch

from ..backbones.base import Condition
from ..noising import Noised
from ..unlearn_data import UnlearnData, class_erasure_data
from ..utils import EraseError, logger, step_generator


# The options that shape a text concept's generated images; a class model trains on real images.
TEXT_DATA_OPTIONS = ("images", "image_guidance", "anchor_in_retain", "image_steps")


def build_unlearn_data(model, forget, retain=None, anchor=None, dataset: str | None = None, images: int | None = None,
                       image_guidance: float | None = None, anchor_in_retain: bool | None = None,
                       image_steps: int | None = None) -> UnlearnData:
    """The forget/retain sets for what the user asked `model` to erase.

    Class-conditional models: `forget`, `retain`, `anchor` are class ids or names, the images come
    from `dataset` (default: the model's training set). Text-to-image models: `forget` is a shipped
    concept name (`nudity`), a concept folder or a literal prompt; `anchor` and `retain` override the
    concept's anchor prompt and retain prompts (file or comma list); `images` are generated per set
    at guidance `image_guidance` with `image_steps` sampling steps (default: the model's), cached as latents.
    """
    if model.condition_kind == "class":
        text_only = {"--images": images, "--image-guidance": image_guidance, "--no-anchor-in-retain": anchor_in_retain,
                     "image_steps": image_steps}
        if given := [option for option, value in text_only.items() if value is not None]:
            raise EraseError(f"{given[0]} applies to the images generated for a text concept; class "
                             "erasure uses the dataset's real images (choose them with --dataset)")
        return class_erasure_data(model, forget, retain, anchor, dataset)
    from ..concept_data import ConceptDataConfig, concept_unlearn_data
    from ..concept_sets import is_concept_list, resolve_concepts
    from ..concepts import Vocabulary, describe_concept, load_concept
    from ..suggest import looks_like_path

    if dataset is not None:
        raise EraseError("--dataset applies to class-conditional models; a text concept's images are "
                         "generated from its prompts (set how many with --images)")
    if isinstance(retain, str) and not looks_like_path(retain):  # a path must exist: read_prompts says so
        retain = [p.strip() for p in retain.split(",") if p.strip()]
    chosen = {"images": images, "guidance": image_guidance, "anchor_in_retain": anchor_in_retain, "steps": image_steps}
    config = ConceptDataConfig(**{k: v for k, v in chosen.items() if v is not None})
    # A model that records its vocabulary (the miniatures) resolves a class word from its own captions.
    vocabulary = Vocabulary.from_info(model.info)
    if is_concept_list(forget):
        return _several_concepts_data(model, resolve_concepts(forget, retain, anchor, vocabulary=vocabulary), config)
    concept = load_concept(forget, anchor=anchor, retain=retain, vocabulary=vocabulary)
    logger.info("erasing %s", describe_concept(concept))  # before any image is generated
    return concept_unlearn_data(model, concept, config)


def _several_concepts_data(model, concepts, config) -> UnlearnData:
    """Each concept's images (its own cache: forget and anchor images, and the merged retain prompts'),
    joined: every concept's forget samples labelled with it, and the parts' retain sets (with each
    part's anchor images when `anchor_in_retain`, so that anchors and retain images keep the shares
    one concept's run gives them)."""
    from ..concept_data import concept_unlearn_data
    from ..concepts import describe_concept

    for concept in concepts.concepts:  # every set before any image is generated
        logger.info("erasing %s", describe_concept(concept))
    parts = {c.name: concept_unlearn_data(model, c, config) for c in concepts.concepts}
    return UnlearnData.joined(parts, {"kind": "concepts", **concepts.describe(),
                                      "parts": {name: part.description for name, part in parts.items()}})


def draw_shards(data: UnlearnData, model, n_forget: int, n_retain: int, seed: int, antithetic: bool, step: int,
                process: int, shards: int):
    """This process's batch of `step`: `shards` draws, each from its own (seed, step, shard) generator.

    Every draw comes from (seed, step, shard) alone, so a resumed run is identical, and one process
    drawing shards 0..N-1 sees what N processes drawing one shard each see.
    """
    parts = [data.draw(model, n_forget // shards, n_retain // shards,
                       step_generator(seed, step, process * shards + j), antithetic)
             for j in range(shards)]
    if shards == 1:
        return parts[0]

    def cat(values):  # tensors, or conditions (named tensors)
        return Condition.cat(values) if isinstance(values[0], Condition) else torch.cat(values)

    def join(batches):
        if batches[0] is None:
            return None
        return Noised(**{f.name: None if getattr(batches[0], f.name) is None else
                         cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(Noised)})

    return join([p[0] for p in parts]), join([p[1] for p in parts])
