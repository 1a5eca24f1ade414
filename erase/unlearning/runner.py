"""`erase unlearn`: run a recipe's stages (or one method, the recipe of one stage) into one output folder.

The runner owns what spans stages: the output folder and its checks, the device, the original
model's weights (the final `delta.safetensors` is against them) and, when a stage's retain term
keeps the original, its frozen copy. Each stage is set up, run and checkpointed by
`erase.unlearning.running` and `erase.unlearning.state`; a finished stage of a recipe is kept in its
checkpoint folder, so a killed recipe resumes at the stage and step where it stopped, and gives the
same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import torch

from ..checkpoint import latest_checkpoint
from ..config import config_dict, make_config
from ..methods import METHODS, MethodConfig, get_method
from ..outputs import check_output
from ..unlearn_data import UnlearnData
from ..utils import EraseError, logger, reset_peak_memory, resolve_mixed_precision
from .command import equivalent_command
from .data import TEXT_DATA_OPTIONS, build_unlearn_data
from .outputs import load_stage_done, recipe_record, save_stage_done, stage_adapter, stage_record, write_output
from .recipe import Recipe, load_recipe, one_stage, recipe_or_default
from .running import finish, resolve_params, run_steps, set_up
from .state import restore_state, save_state
from .terms import Terms, frozen_teacher, terms_from_options


def tracker_names(report_to: str | None) -> list[str]:
    """accelerate tracker names from a comma-separated list, refused up front when not installed."""
    from accelerate.tracking import get_available_trackers

    names = [n.strip() for n in (report_to or "").split(",") if n.strip()]
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        raise EraseError(f"--report-to {','.join(missing)}: not installed (pip install {' '.join(missing)}); "
                         f"available here: {', '.join(sorted(available)) or 'none'}")
    return names


def check_data_options(images: int | None, image_guidance: float | None) -> None:
    if images is not None and images < 1:
        raise EraseError(f"--images must be at least 1, got {images}")
    if image_guidance is not None and not (math.isfinite(image_guidance) and image_guidance > 0):
        raise EraseError(f"--image-guidance must be a positive number (1 is plain conditional sampling), "
                         f"got {image_guidance}")


def unlearn(model, method: str | None = None, forget=None, out: str | Path | None = None, *, recipe=None,
            retain=None, anchor=None, dataset: str | None = None, images: int | None = None,
            image_guidance: float | None = None, anchor_in_retain: bool | None = None, data: UnlearnData | None = None,
            config: MethodConfig | dict | None = None, terms: Terms | dict | None = None, resume: bool = True,
            keep_checkpoints: bool = False, stop_after: int | None = None, progress: bool = True,
            overwrite: bool = False, shards: int = 1, report_to: str | None = None, checkpoint_minutes: float = 5.0,
            **options) -> Path:
    """Unlearn `forget` from `model` with `method` (one stage) or `recipe`, and write the result to `out`.

    `model` is a model folder or a backbone object (trained in place); `forget`/`retain`/`anchor` are
    class ids or names, or a text concept (or pass a prebuilt `data`). With `method`, `config` and
    `**options` (e.g. `steps=100, lr=1e-4`) set the method's config and `terms` its terms
    (`erase.unlearning.terms`). With `recipe` (a shipped recipe's name, a JSON file, a dict or a
    `Recipe`), the recipe sets every stage; `**options` may only set run-wide fields (`seed`,
    `mixed_precision`, `gradient_checkpointing`, `checkpoint_every`). With neither, the recommended
    recipe `DEFAULT_RECIPE` (recipes/forget.json) runs. `stop_after=k` stops after the
    run's k-th step (counted over the stages) with a checkpoint and no model, as an interruption would
    (a later call resumes). Returns `out`, or the checkpoint when stopped early. `out` must be new,
    empty or an earlier `erase unlearn` output unless `overwrite` (see `erase.outputs`). `report_to`
    ("tensorboard", or several comma-separated accelerate trackers) logs every step's losses under
    OUT-logs/ as well.

    `shards=k` draws each process's batch as k equal shards, shard j of process p from the
    generator of (seed, step, p·k + j): one process with `shards=N` and N times the batch draws
    exactly the samples that N processes draw, which is how data-parallel exactness is tested.
    `checkpoint_minutes`: a checkpoint is also written after this much wall time since the last one.
    """
    if not checkpoint_minutes > 0:
        raise EraseError(f"--checkpoint-minutes must be a positive number, got {checkpoint_minutes}")
    from ..edits import EDITS

    if method in EDITS:  # a closed-form edit: no data, no loop (erase/edits/run.py)
        from ..edits.run import run_edit

        return run_edit(model, method, forget, out, retain=retain, anchor=anchor, config=config, overwrite=overwrite,
                        loop_options={"recipe": recipe, "dataset": dataset, "images": images,
                                      "image_guidance": image_guidance, "anchor_in_retain": anchor_in_retain,
                                      "data": data, "terms": terms, "stop_after": stop_after, "report_to": report_to},
                        **options)
    if isinstance(forget, str) and forget.strip().lower() in METHODS:
        raise EraseError(f"--forget {forget} is a method, not what to erase: give it with --method, and the class "
                         "or concept with --forget")
    old_terms, teacher_path = terms_from_options(options)  # --ema-decay, --retain-target, ... (deprecated)
    if method is not None and recipe is not None:
        raise EraseError("give a method (--method) or a recipe (--recipe), not both")
    recipe = recipe_or_default(method, recipe)
    given_recipe, config_values = recipe, None
    if recipe is not None:
        if config is not None or terms is not None or old_terms != Terms() or teacher_path:
            raise EraseError("a recipe sets each stage's config and terms: give them in the recipe file, "
                             "not beside --recipe")
        recipe = load_recipe(recipe)
    else:
        if terms is not None and old_terms != Terms():
            raise EraseError("give the terms once: as terms=..., or as the deprecated options, not both")
        terms = terms if isinstance(terms, Terms) else Terms.from_dict(terms) if terms else old_terms
        method_cls = get_method(method)
        config_values = config_dict(make_config(method_cls, config, **options))
        recipe = one_stage(method_cls.name, config_values, terms)
        options = {}
    if unknown := sorted(set(options) - {"seed", "mixed_precision", "gradient_checkpointing", "checkpoint_every"}):
        raise EraseError(f"{unknown[0]} is set per stage by the recipe; a command line may set seed, "
                         f"mixed_precision, gradient_checkpointing and checkpoint_every for every stage")
    check_data_options(images, image_guidance)
    request = {"forget": forget, "retain": retain, "anchor": anchor, "dataset": dataset, "data": data,
               "data_options": {k: v for k, v in {"images": images, "image_guidance": image_guidance,
                                                  "anchor_in_retain": anchor_in_retain}.items() if v is not None}}
    command = None if out is None else equivalent_command(
        str(model) if isinstance(model, (str, Path)) else model.info.get("source", "in-memory model"), out, forget,
        request, method=method, config=config_values, recipe=given_recipe, run_wide=options,
        has_terms=given_recipe is None and recipe.stages[0].terms != Terms())
    return run_recipe(model, recipe, out, request, overrides=options, teacher_path=teacher_path, resume=resume,
                      keep_checkpoints=keep_checkpoints, stop_after=stop_after, progress=progress,
                      overwrite=overwrite, shards=shards, report_to=report_to, checkpoint_minutes=checkpoint_minutes,
                      command=command)


class RecipeRun:
    """The state that spans a recipe's stages: the model, the device, the original's weights and teacher."""

    def __init__(self, model, recipe: Recipe, out: Path, stages: list, accelerator, teacher_path: str | None,
                 shards: int):
        self.model, self.recipe, self.out, self.stages = model, recipe, out, stages
        self.accelerator, self.shards, self.teacher_path = accelerator, shards, teacher_path
        self.single = len(stages) == 1
        self.adapter = None  # a single stage trained as a LoRA (its Training, after the merge)
        self.data: list = []  # each stage's UnlearnData (`stage_data`)
        self.ckpt_root = out.with_name(out.name + "-checkpoints")
        self.groups = [resolve_params(model, config.params, method.params_preference_for(model))
                       for method, config, _, _ in stages]  # before any data is generated
        watched = {n for g in self.groups for n in model.trainable_parameters(g)}
        self.params_all = {n: p for n, p in model.trainable_parameters("all").items() if n in watched}
        self.original = {n: p.detach().cpu().clone() for n, p in self.params_all.items()}
        # The original's frozen denoiser, taken before any stage moves the weights, when a retain term
        # keeps it (or from --retain-reference, loaded now so that a mismatch is refused at once).
        wants_original = any(terms.retain is not None and terms.retain.teacher == "original" and (i or teacher_path)
                             for i, (_, _, terms, _) in enumerate(stages))
        self.original_teacher = frozen_teacher(model, teacher_path) if wants_original else None

    def terms_record(self, terms: Terms) -> dict:
        """The terms as recorded; a retain term keeping a model given by path (--retain-reference) names it."""
        record = terms.to_dict()
        if self.teacher_path and terms.retain is not None and terms.retain.teacher == "original":
            record["retain"]["model"] = str(self.teacher_path)
        return record

    def stage_dir(self, i: int) -> Path:
        method = self.stages[i][0].name
        return self.ckpt_root if self.single else self.ckpt_root / f"stage-{i + 1}-{method}"

    def teacher(self, terms: Terms):
        """The retain term's frozen teacher: the original's (taken at the start) or a copy of the stage's input."""
        if terms.retain is not None and terms.retain.teacher == "original" and self.original_teacher is not None:
            return lambda: self.original_teacher
        return self.model.frozen_copy

    def changed(self) -> dict[str, torch.Tensor]:
        """Every watched tensor that differs from the original's."""
        return {n: p.detach().cpu().contiguous() for n, p in self.params_all.items()
                if not torch.equal(p.detach().cpu(), self.original[n])}

    def apply_done(self, delta: dict[str, torch.Tensor]) -> None:
        """A finished stage's weights: the original's, with the stage's delta against them."""
        with torch.no_grad():
            for n, p in self.params_all.items():
                p.copy_(delta.get(n, self.original[n]))


def run_recipe(model, recipe: Recipe, out: str | Path | None, request: dict, *, overrides: dict | None = None,
               teacher_path: str | None = None, resume: bool = True, keep_checkpoints: bool = False,
               stop_after: int | None = None, progress: bool = True, overwrite: bool = False, shards: int = 1,
               report_to: str | None = None, checkpoint_minutes: float = 5.0, command: str | None = None) -> Path:
    """Run every stage of `recipe` on `model`; see `unlearn` for the arguments. `command`: the equivalent
    `erase unlearn` command the record holds when no command line is recording (`erase.unlearning.command`)."""
    from accelerate import Accelerator

    from ..backbones import run_model

    if out is None:
        raise EraseError("give an output folder (--out)")
    stages = recipe.built(overrides)  # every stage checked before any work
    inputs = [model] if isinstance(model, (str, Path)) else []
    check_output(out, "unlearn", overwrite, inputs=inputs + [teacher_path], checkpoints=True)
    model, base_model = run_model(model)
    out = Path(out)
    trackers = tracker_names(report_to)
    mixed = resolve_mixed_precision(stages[0][1].mixed_precision)
    # Without a GPU, processes started by `accelerate launch` join one gloo group only when told to use the CPU.
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), log_with=trackers or None,
                              project_dir=out.with_name(out.name + "-logs") if trackers else None)
    reset_peak_memory(accelerator.device)
    model.to(accelerator.device)
    run = RecipeRun(model, recipe, out, stages, accelerator, teacher_path, shards)
    run.data = stage_data(model, stages, request)
    if run.ckpt_root.exists() and not resume:
        shutil.rmtree(run.ckpt_root)
    if trackers:
        accelerator.init_trackers(out.name, config={"recipe": recipe.name, "stages": len(stages)})
    finished, steps_before = [], 0
    for i in range(len(stages)):
        if stop_after is not None and steps_before >= stop_after:  # stopped between two stages
            return run.stage_dir(i - 1) / "done"
        result = run_stage(run, i, request, base_model, mixed, steps_before, stop_after, progress, bool(trackers),
                           checkpoint_minutes)
        if isinstance(result, Path):  # stopped early
            return result
        finished.append(result)
        steps_before += stages[i][1].steps
    if trackers:
        accelerator.end_training()
    if accelerator.is_main_process:
        changed = run.changed()
        records = [record for record, _ in finished]
        summary = ({**records[0], "recipe_name": recipe.name, "target": recipe.target} if run.single
                   else recipe_record(recipe, records, len(changed), base_model))
        history = finished[0][1] if run.single else [{"stage": i, **e} for i, (_, h) in enumerate(finished, 1)
                                                      for e in h]
        write_output(out, model, changed, summary, history, command=command, recipe=None if run.single else recipe,
                     stages=() if run.single else finished, adapter=run.adapter,
                     stage_adapters=() if run.single else [stage_adapter(run.stage_dir(i))
                                                           for i in range(len(stages))])
        if not keep_checkpoints:
            shutil.rmtree(run.ckpt_root, ignore_errors=True)
        logger.info("%s: saved %s (%d steps, %.1f s)", recipe.name, out, summary["steps"], summary["wall_time_s"])
    accelerator.wait_for_everyone()
    return out


def stage_data(model, stages: list, request: dict) -> list:
    """Every stage's data, built before the first stage moves a weight: a text concept's images are the
    original model's drawings of it, in every stage (a later stage drawing them from the partly erased
    model would erase whatever that model draws for the prompt instead of the concept). Stages with
    the same data options share one build. On a class model a recipe's text-image options are left
    out (and recorded), so that one recipe file serves every backbone; given on the command line they
    are refused."""
    if request["data"] is not None:
        return [request["data"]] * len(stages)
    built, keys = {}, []
    for *_, data_options in stages:
        skipped = sorted(k for k in data_options if k in TEXT_DATA_OPTIONS) if model.condition_kind == "class" else []
        options = {**{k: v for k, v in data_options.items() if k not in skipped}, **request["data_options"]}
        keys.append(repr(sorted(data_options.items())))  # the command line's options are the same for every stage
        if keys[-1] not in built:
            data = build_unlearn_data(model, request["forget"], request["retain"], request["anchor"],
                                      dataset=request["dataset"], **options)
            if skipped:
                logger.info("the recipe's %s apply to a text concept's images: not used on a class model",
                            ", ".join(skipped))
                data = dataclasses.replace(data, description={**data.description, "recipe_options_not_applied": skipped})
            built[keys[-1]] = data
    return [built[key] for key in keys]


def run_stage(run: RecipeRun, i: int, request: dict, base_model: str, mixed: str, steps_before: int,
              stop_after: int | None, show: bool, trackers: bool, checkpoint_minutes: float = 5.0):
    """Stage i: (record, loss history), taken from its `done/` folder when an earlier run finished it;
    or the checkpoint path when `stop_after` falls inside it."""
    method, config, terms, data_options = run.stages[i]
    folder = run.stage_dir(i)
    settings = {"method": method.name, "config": config_dict(config), "terms": run.terms_record(terms),
                "base_model": base_model, "data": {**data_options, **request["data_options"]}}
    if not run.single and (done := load_stage_done(folder, settings)) is not None:
        delta, record, history = done
        run.apply_done(delta)
        return record, history
    model, accelerator = run.model, run.accelerator
    t = set_up(model, method, config, terms, run.data[i], run.groups[i], accelerator, run.shards, run.teacher(terms))
    record_keys = {"method": method.name, "config": config_dict(t.config), "params": t.group,
                   "base_model": base_model, "data": t.data.description, "terms": run.terms_record(terms)}
    if not run.single:
        record_keys["stage"] = i + 1
    progress = restore_state(folder, t, record_keys)
    end = config.steps if stop_after is None else max(0, min(stop_after - steps_before, config.steps))
    run_steps(t, progress, end, accelerator, shards=run.shards, ckpt_dir=folder,
              checkpoint=lambda step: save_state(folder, step, t, progress, record_keys),
              stop_after=None if stop_after is None else stop_after - steps_before, trackers=trackers, show=show,
              checkpoint_minutes=checkpoint_minutes)
    if end < config.steps:
        return latest_checkpoint(folder)
    finish(t, accelerator)
    if run.single and t.lora is not None:  # the whole run's change is this adapter: saved with the outputs
        run.adapter = t
    changed = run.changed()
    record = stage_record(t, progress, sum(1 for n in changed if n in t.params), base_model, accelerator.device,
                          mixed, accelerator.num_processes)
    record["terms"] = record_keys["terms"]
    if not run.single and accelerator.is_main_process:
        save_stage_done(folder, changed, record, progress.history, settings,
                        adapter=t if t.lora is not None else None)  # a LoRA stage's adapter, kept for the output
    return record, progress.history
