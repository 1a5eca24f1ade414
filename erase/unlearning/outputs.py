"""What a finished run leaves: the model folder, `delta.safetensors` against the original,
`erase_config.json` (the run's record), `loss_history.jsonl` (every logged step's losses, one JSON
object per line) and, for a recipe of several stages, the recipe and each stage's record and losses.

Between stages of a recipe, a finished stage is kept in its checkpoint folder (`done/`: its weights
as a delta against the original, its record, its losses and, for a stage trained as a LoRA, its
adapter), so that a killed recipe resumes at the stage where it stopped.

A LoRA adapter is the change of the stage that trained it: `RUN/lora/` for a run of one stage,
`RUN/stages/N-METHOD/lora/` for each LoRA stage of a recipe (stage N's change on top of the stages
before it). A recipe of several stages has no single adapter of its whole change; `erase export RUN
--format diffusers-lora` factors the final delta against the original into one.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import check_same_config
from ..config import config_dict
from ..lora import ADAPTER_FOLDER
from ..outputs import UNLEARN_CONFIG as CONFIG_FILE, UNLEARN_DELTA as DELTA_FILE, mark_output, recorded_command
from ..utils import atomic_dir, package_versions, peak_memory_mb, read_json, write_json
from .running import Progress, Training

LOSS_HISTORY_FILE = "loss_history.jsonl"
RECIPE_FILE = "recipe.json"
STAGES_DIR = "stages"
DONE_DIR = "done"


def stage_record(t: Training, progress: Progress, changed: int, base_model: str, device, mixed: str,
                 processes: int) -> dict:
    """The record of one stage: what it ran with, on what, what it changed, how long it took, its losses."""
    record = {
        "method": t.method.name, "paper": t.method.paper(), "config": config_dict(t.config),
        "terms": t.terms.to_dict(), "params": t.group, "trainable_parameters": sum(p.numel() for p in t.params.values()),
        "changed_tensors": changed, "base_model": base_model, "data": t.data.description,
        "seed": t.config.seed, "steps": t.config.steps, "wall_time_s": round(progress.elapsed, 2),
        "seconds_per_step": statistics.median(progress.step_times) if progress.step_times else None,
        "peak_memory_mb": round(peak_memory_mb(device), 1), "device": str(device), "mixed_precision": mixed,
        "processes": processes,
        "final_losses": final_losses(progress.recent),
        "versions": package_versions()}
    if t.paths_seconds is not None:
        record["retain_paths_s"] = t.paths_seconds  # drawing the sampling paths, once per stage (not in wall_time_s)
    if t.lora is not None:
        record["lora"] = t.lora.summary()
        record["trainable_parameters"] = record["lora"]["trainable_parameters"]
    if t.average is not None:
        record["ema_final_decay"] = t.average.get_decay(t.average.optimization_step)
    return record


def final_losses(recent: list[dict]) -> dict[str, float]:
    """Each loss's mean over the last steps that logged it (a concept's loss is logged every LOG_EVERY-th step)."""
    names = dict.fromkeys(k for r in recent for k in r)
    return {k: statistics.fmean(r[k] for r in recent if k in r) for k in names}


def recipe_record(recipe, records: list[dict], changed: int, base_model: str) -> dict:
    """The record of a recipe of several stages: the recipe, its target, and every stage's record."""
    last = records[-1]
    return {"recipe": recipe.to_dict(), "target": recipe.target, "method": recipe.name,
            "stages": records, "base_model": base_model, "data": last["data"], "seed": last["seed"],
            "steps": sum(r["steps"] for r in records), "changed_tensors": changed,
            "wall_time_s": round(sum(r["wall_time_s"] for r in records), 2),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in records), "device": last["device"],
            "versions": package_versions()}


def save_stage_done(folder: Path, changed: dict[str, torch.Tensor], record: dict, history: list[dict],
                    settings: dict, adapter: Training | None = None) -> None:
    """A finished stage of a recipe: its weights (what differs from the original), record, losses, the
    settings it ran with (a resume under other settings is refused) and, for a LoRA stage, its adapter."""
    with atomic_dir(folder / DONE_DIR) as tmp:
        save_file({n: t.detach().cpu().contiguous() for n, t in changed.items()}, tmp / DELTA_FILE)
        write_json(tmp / CONFIG_FILE, {"record": record, "history": history, "settings": settings})
        if adapter is not None:
            adapter.lora.save_adapter(tmp / ADAPTER_FOLDER, adapter.adapter)


def stage_adapter(folder: Path) -> Path | None:
    """The adapter a finished LoRA stage of a recipe saved in its `done/` folder (None for a full stage)."""
    adapter = folder / DONE_DIR / ADAPTER_FOLDER
    return adapter if adapter.is_dir() else None


def load_stage_done(folder: Path, settings: dict) -> tuple[dict[str, torch.Tensor], dict, list[dict]] | None:
    """A finished stage's (delta, record, history), if an earlier run of the same settings finished it."""
    done = folder / DONE_DIR
    if not (done / CONFIG_FILE).is_file():
        return None
    saved = read_json(done / CONFIG_FILE, what="finished stage")
    check_same_config(saved["settings"], settings, f"from {done}")
    return load_file(done / DELTA_FILE), saved["record"], saved["history"]


def write_history(path: Path, history: list[dict]) -> None:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in history))


def write_output(out: Path, model, changed: dict[str, torch.Tensor], summary: dict, history: list[dict] | None,
                 recipe=None, stages: list[tuple[dict, list[dict]]] = (), adapter: Training | None = None,
                 stage_adapters: list[Path | None] = (), command: str | None = None) -> None:
    """Model, delta, record, loss history (and a recipe's stages) and the marker appear together in one
    folder swap: a run killed or out of disk while saving leaves no folder that loads, and the rerun
    resumes from the checkpoints. `adapter`: a single stage trained as a LoRA, whose adapter is saved
    in `lora/` too; `stage_adapters`: per stage of a recipe, the saved adapter of a LoRA stage (copied
    to `stages/N-METHOD/lora/`) or None. `history` None (a closed-form edit, `erase.edits.run`) writes
    no loss history. `command`: the equivalent `erase unlearn` command of a run started from Python,
    recorded when no command line is recording."""
    # The `erase unlearn` command that made it, as given on the command line, else its equivalent.
    if command := recorded_command("unlearn") or command:
        summary = {**summary, "command": command}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, unlearning={k: summary[k] for k in ("method", "config", "params", "base_model",
                                                                       "data", "steps", "recipe") if k in summary})
        model.save_delta(tmp / DELTA_FILE, changed, method=summary["method"])
        write_json(tmp / CONFIG_FILE, summary)
        if history is not None:
            write_history(tmp / LOSS_HISTORY_FILE, history)
        if adapter is not None:
            adapter.lora.save_adapter(tmp / ADAPTER_FOLDER, adapter.adapter)
        if recipe is not None:
            write_json(tmp / RECIPE_FILE, recipe.to_dict())
            for i, (record, stage_history) in enumerate(stages, 1):
                folder = tmp / STAGES_DIR / f"{i}-{record['method']}"
                folder.mkdir(parents=True)
                write_json(folder / CONFIG_FILE, record)
                write_history(folder / LOSS_HISTORY_FILE, stage_history)
                if i <= len(stage_adapters) and stage_adapters[i - 1] is not None:
                    shutil.copytree(stage_adapters[i - 1], folder / ADAPTER_FOLDER)
        mark_output(tmp, "unlearn")
