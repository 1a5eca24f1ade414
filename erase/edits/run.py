"""`erase unlearn --method uce|speed`: an edit run, written as a fine-tuning run is.

The output folder holds the same things (`erase.loop`): the model as a pipeline folder,
`delta.safetensors` (the edited layers' weights), `erase_config.json` (every setting, the concepts,
the residuals of each round and the wall time) and the output marker; all appear together in one
folder swap. `erase.unlearning.unlearn` hands a run to `run_edit` before any stage starts.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import build_config, config_dict
from ..outputs import UNLEARN_CONFIG, UNLEARN_DELTA, check_output, mark_output, recorded_command
from ..unlearning.command import equivalent_command
from ..utils import EraseError, atomic_dir, logger, package_versions, write_json
from . import get_edit
from .base import EditConfig, apply_edit

# Options of the fine-tuning loop that mean nothing to an edit (no images, no steps, no checkpoints).
_LOOP_ONLY = ("recipe", "dataset", "images", "image_guidance", "anchor_in_retain", "data", "terms", "stop_after",
              "report_to")


def edit_config(edit_cls, config: EditConfig | dict | None, **options) -> EditConfig:
    if isinstance(config, EditConfig):
        if not isinstance(config, edit_cls.Config):
            raise EraseError(f"{type(config).__name__} is not the config of {edit_cls.name} ({edit_cls.Config.__name__})")
        values = config_dict(config)
    else:
        values = dict(config or {})
    return build_config(edit_cls.Config, {**values, **options})


def run_edit(model, method: str, forget, out: str | Path | None, *, retain=None, anchor=None, config=None,
             overwrite: bool = False, loop_options: dict | None = None, **options) -> Path:
    """Erase the concepts `forget` names (`erase.concept_sets`) from `model` with the edit `method`
    and write the result to `out`. `options` are the edit's config fields."""
    from ..backbones import load_backbone
    from ..concept_sets import resolve_concepts

    if out is None:
        raise EraseError("give an output folder (--out)")
    edit_cls = get_edit(method)
    given = sorted(k for k, v in (loop_options or {}).items() if k in _LOOP_ONLY and v is not None)
    if given:
        raise EraseError(f"{method} is a closed-form edit (no images, no training loop): "
                         f"{', '.join('--' + g.replace('_', '-') for g in given)} applies to fine-tuning methods only")
    config = edit_config(edit_cls, config, **options)
    check_output(out, "unlearn", overwrite, inputs=[model] if isinstance(model, (str, Path)) else [])
    concepts = resolve_concepts(forget, retain=retain, anchor=anchor)  # before the model loads
    base_model = str(model) if isinstance(model, (str, Path)) else model.info.get("source", "in-memory model")
    if isinstance(model, (str, Path)):
        model = load_backbone(model)
    started = time.perf_counter()
    pairs = [(prompt, c.anchor) for c in concepts.concepts for prompt in c.forget]
    changed, details = apply_edit(model, edit_cls(config), pairs, concepts.retain)
    elapsed = time.perf_counter() - started
    data = {**concepts.describe(), "anchor": anchor}
    summary = {"method": edit_cls.name, "paper": edit_cls.paper(), "config": config_dict(config),
               "params": "text-entry", "trainable_parameters": sum(t.numel() for t in changed.values()),
               "changed_tensors": len(changed), "base_model": base_model, "data": data, "seed": None, "steps": 0,
               "wall_time_s": round(elapsed, 3), "seconds_per_step": None, "edit": details,
               "device": str(model.device), "versions": package_versions()}
    # The `erase unlearn` command that made it, as given on the command line, else its equivalent.
    if command := recorded_command("unlearn") or equivalent_command(
            base_model, out, forget, {"retain": retain, "anchor": anchor}, method=edit_cls.name,
            config=summary["config"]):
        summary["command"] = command
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, unlearning={k: summary[k] for k in ("method", "config", "params", "base_model",
                                                                       "data", "steps")})
        model.save_delta(tmp / UNLEARN_DELTA, changed, method=edit_cls.name)
        write_json(tmp / UNLEARN_CONFIG, summary)
        mark_output(tmp, "unlearn")
    last = details["rounds"][-1]
    logger.info("%s: saved %s (%d concepts, %.2f s; erased rows' output error %.3f, preserved rows' change %.2e)",
                edit_cls.name, out, len(concepts.concepts), elapsed, last["erase_error"], last["preserve_change"])
    return Path(out)
