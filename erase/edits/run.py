"""`erase unlearn --method uce|speed`: an edit run, written as a fine-tuning run is.

The output folder is written as a fine-tuning run's (`erase.unlearning.outputs.write_output`): the
model as a pipeline folder, `delta.safetensors` (the edited layers' weights), `erase_config.json`
(every setting, the concepts, the residuals of each round, the wall time and the `erase unlearn`
command when one made it) and the output marker, with no loss history (an edit has no steps); all
appear together in one folder swap. `erase.unlearning.unlearn` hands a run to `run_edit` before any
stage starts.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import config_dict, make_config
from ..outputs import check_output
from ..unlearning.command import equivalent_command
from ..unlearning.outputs import write_output
from ..utils import EraseError, logger, package_versions
from . import get_edit
from .base import apply_edit

# Options of the fine-tuning loop that mean nothing to an edit (no images, no steps, no checkpoints).
_LOOP_ONLY = ("recipe", "dataset", "images", "image_guidance", "anchor_in_retain", "data", "terms", "stop_after",
              "report_to")


def run_edit(model, method: str, forget, out: str | Path | None, *, retain=None, anchor=None, config=None,
             overwrite: bool = False, loop_options: dict | None = None, **options) -> Path:
    """Erase the concepts `forget` names (`erase.concept_sets`) from `model` with the edit `method`
    and write the result to `out`. `options` are the edit's config fields."""
    from ..backbones import run_model
    from ..concept_sets import resolve_concepts

    if out is None:
        raise EraseError("give an output folder (--out)")
    edit_cls = get_edit(method)
    given = sorted(k for k, v in (loop_options or {}).items() if k in _LOOP_ONLY and v is not None)
    if given:
        raise EraseError(f"{method} is a closed-form edit (no images, no training loop): "
                         f"{', '.join('--' + g.replace('_', '-') for g in given)} applies to fine-tuning methods only")
    config = make_config(edit_cls, config, **options)
    check_output(out, "unlearn", overwrite, inputs=[model] if isinstance(model, (str, Path)) else [])
    # Before the model loads; a miniature's class words (`three,five,seven`) resolve from its recorded captions.
    concepts = resolve_concepts(forget, retain=retain, anchor=anchor, vocabulary=_recorded_vocabulary(model))
    model, base_model = run_model(model)
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
    # As a fine-tuning run's output, without losses; the command as given on the command line, else its equivalent.
    command = equivalent_command(base_model, out, forget, {"retain": retain, "anchor": anchor}, method=edit_cls.name,
                                 config=summary["config"])
    write_output(Path(out), model, changed, summary, history=None, command=command)
    residuals = "; ".join(f"{name}: erased rows' output error {entry['rounds'][-1]['erase_error']:.3f}, preserved "
                          f"rows' change {entry['rounds'][-1]['preserve_change']:.2e}"
                          for name, entry in details["entries"].items())
    logger.info("%s: saved %s (%d concepts, %.2f s; %s)", edit_cls.name, out, len(concepts.concepts), elapsed, residuals)
    return Path(out)


def _recorded_vocabulary(model):
    """The vocabulary a model records (a loaded backbone's info, or its folder's erase_info.json), if any."""
    from ..backbones.pipeline import INFO_FILE
    from ..concepts import Vocabulary
    from ..resources import model_location
    from ..utils import read_json

    if not isinstance(model, (str, Path)):
        return Vocabulary.from_info(getattr(model, "info", None))
    info_file = Path(model_location(model)).expanduser() / INFO_FILE
    return Vocabulary.from_info(read_json(info_file, what="model info").get("info")) if info_file.is_file() else None
