"""`erase bench --edits uce,speed`: what a closed-form edit costs for 1, 10, 100 ... concepts, against one
fine-tuning step of the same model, measured in one run.

The concepts and their prompts come from a mass-erasure prompt file (`--concepts-file`, the
published `id,type,text,concept,seed` layout): the first k concepts of its erase rows, with every
retain row kept. An edit has two parts, timed apart: encoding the prompts (one text-encoder forward
each; on a CPU at SD 1.5's size this is nearly all of it), measured once for the prompts of the
largest k (its erase and retain prompts, and the null text), and `apply_edit` on those cached
encodings (gathering the rows, the solve, the new weights written into the layers), measured for
each k. A fresh run at the largest k costs the sum of the two. The model is already loaded, as a
fine-tuning step's time is the loop's median step with the model and data in memory. Wall and CPU
(process) seconds are both recorded: on a shared machine the wall time depends on the load. The fine-tuning step trains on random
latents of the model's size in place of generated images: a step's cost does not depend on what
the images show, and generating them would dominate the run on a CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..utils import EraseError, logger


def _finetune_step_seconds(path: Path, model, forget: list[str], retain: list[str], config, workdir: Path) -> dict:
    from ..backbones import load_backbone
    from ..loop import unlearn
    from ..unlearn_data import UnlearnData
    from ..utils import read_json

    g = torch.Generator().manual_seed(0)
    n = 2 * (config.batch_size or 64)
    prompts = (forget * n)[:n]
    kept = (retain * n)[:n]
    data = UnlearnData(forget_x0=torch.randn(n, *model.sample_shape, generator=g),
                       forget_cond=model.encode_conditions(prompts), anchor_cond=model.null_condition(n),
                       retain_x0=torch.randn(n, *model.sample_shape, generator=g), retain_cond=model.encode_conditions(kept),
                       description={"kind": "random latents (cost only)"})
    options = {"steps": config.steps, "checkpoint_every": 10**9, "mixed_precision": config.mixed_precision}
    if config.batch_size is not None:
        options["batch_size"] = config.batch_size
    if config.finetune_params is not None:
        options["params"] = config.finetune_params
    unlearn(load_backbone(path), "finetune", out=workdir / "finetune", data=data, progress=False, resume=False,
            **options)
    info = read_json(workdir / "finetune" / "erase_config.json", what="run summary")
    return {"seconds_per_step": info["seconds_per_step"], "batch_size": info["config"]["batch_size"],
            "params": info["params"], "steps": config.steps}


def edit_bench(config, path: Path, model, workdir: Path) -> dict:
    """Rows of (edit, concepts, seconds) and the finetune step they are compared with."""
    from ..concept_sets import read_mass_concepts
    from . import apply_edit, get_edit

    if config.concepts_file is None:
        raise EraseError("--edits needs --concepts-file: a mass-erasure prompt file (id,type,text,concept,seed)")
    edits = [get_edit(name.strip()) for name in config.edits.split(",")]
    erase, retain = read_mass_concepts(config.concepts_file)
    if max(config.edit_concepts) > len(erase):
        raise EraseError(f"--edit-concepts asks for {max(config.edit_concepts)} concepts but {config.concepts_file} "
                         f"erases {len(erase)}")
    if not retain:
        raise EraseError(f"{config.concepts_file} has no retain rows: the edits need prompts to keep")
    names = list(erase)
    layers = {name: layer for entry in model.text_entries().values() for name, layer in entry.layers.items()}
    original = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    largest = [p for name in names[:max(config.edit_concepts)] for p in erase[name]]
    wall, cpu = time.perf_counter(), time.process_time()
    model.encode_conditions(list(dict.fromkeys(largest + retain + [""])))  # encoded once, then cached
    encoding = {"prompts": len(set(largest + retain + [""])), "seconds": time.perf_counter() - wall,
                "cpu_seconds": time.process_time() - cpu}
    logger.info("edit bench: encoding %d prompts: %.1f s", encoding["prompts"], encoding["seconds"])
    rows = []
    for round_ in range(config.rounds):
        for edit_cls in edits:
            for k in config.edit_concepts:
                pairs = [(p, "") for name in names[:k] for p in erase[name]]
                started, cpu = time.perf_counter(), time.process_time()
                _, summary = apply_edit(model, edit_cls(edit_cls.Config()), pairs, retain)
                seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
                with torch.no_grad():
                    for name, layer in layers.items():
                        layer.weight.copy_(original[name])
                rows.append({"edit": edit_cls.name, "concepts": k, "round": round_, "seconds": seconds,
                             "cpu_seconds": cpu_seconds, "solve_s": summary["solve_s"],
                             "forget_prompts": len(pairs),
                             "forget_rows": sum(e["forget_rows"] for e in summary["entries"].values()),
                             "preserve_rows": sum(e["preserve_rows"] for e in summary["entries"].values())})
                logger.info("edit bench round %d: %s, %d concepts: %.2f s", round_ + 1, edit_cls.name, k, seconds)
    step = _finetune_step_seconds(path, model, erase[names[0]], retain, config, workdir)
    best = {}
    for row in rows:
        key = (row["edit"], row["concepts"])
        if key not in best or row["seconds"] < best[key]["seconds"]:
            best[key] = row
    table = [{**row, "vs_finetune_step": row["seconds"] / step["seconds_per_step"]} for row in best.values()]
    return {"edits": table, "encoding": encoding, "finetune_step": step, "all_rounds": rows,
            "concepts_file": str(config.concepts_file), "retain_prompts": len(retain)}


def edit_markdown(report: dict) -> list[str]:
    step, enc = report["finetune_step"], report["encoding"]
    lines = [f"One `finetune` step: {step['seconds_per_step']:.3f} s (batch {step['batch_size']}, params "
             f"{step['params']}, median of {step['steps']} steps).",
             f"Encoding the {enc['prompts']} prompts of the largest set once: {enc['seconds']:.1f} s "
             f"(CPU {enc['cpu_seconds']:.1f} s), {enc['seconds'] / step['seconds_per_step']:.2f}x a finetune step.",
             "", "Each edit on the cached encodings (rows, solve, weights):", "",
             "| edit | concepts | forget prompts | erased rows | preserved rows | seconds | CPU s | solve s | "
             "vs one finetune step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["edits"]:
        lines.append(f"| {r['edit']} | {r['concepts']} | {r['forget_prompts']} | {r['forget_rows']} | "
                     f"{r['preserve_rows']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['solve_s']:.2f} | "
                     f"{r['vs_finetune_step']:.3f}x |")
    return lines
