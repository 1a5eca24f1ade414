"""`erase unlearn`, `erase methods` and `erase recipes`.

A method's options come from its config dataclass. `erase unlearn --help` lists the options every
method has (MethodConfig); the parser reads `--method` first, so `erase unlearn --method eupmu
--help` lists them with EUPMU's defaults, followed by the options of EUPMU alone. `--recipe NAME|FILE`
runs a recipe's stages instead (`erase recipes` lists the shipped ones).

The options that were fields of every method before the terms left the config (`--ema-decay`,
`--retain-target`, `--retain-reference`, `--retain-samples`, `--trajectories`, `--adversarial-*`) are
still parsed, hidden from the help, for one release: they build the equivalent one-stage recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from pathlib import Path

from ..config import add_dataclass_arguments, load_config_file
from ..edits import EDITS
from . import METHODS, MethodConfig, get_method


COMMON = tuple(f.name for f in dataclasses.fields(MethodConfig))
# Training options left out of the method-less `erase unlearn --help` (listed with `--method NAME --help`).
OVERVIEW_HIDDEN = ("weight_decay", "grad_clip", "antithetic")


def add_method_options(parser: argparse.ArgumentParser, name: str | None) -> None:
    """The options of every method (with `name`'s defaults when a method is named), then its own."""
    if name in EDITS:  # a closed-form edit has its own options only: no steps, batches or optimizer
        add_dataclass_arguments(parser.add_argument_group(f"options of {name} (a closed-form edit)"),
                                EDITS[name].Config)
        parser.chosen = ("--method", name)
        # A training option (--seed, --steps, ...) is then named as such, rather than as an unknown option.
        parser.option_owners = {"--" + n.replace("_", "-"): ["the fine-tuning methods"] for n in COMMON}
        return
    config_cls = METHODS[name].Config if name in METHODS else MethodConfig
    own = tuple(f.name for f in dataclasses.fields(config_cls) if f.name not in COMMON)
    title = f"options of every method (defaults of {name})" if name in METHODS else "options of every method"
    # Without a method, the overview leaves the finer training options to `--method NAME --help` (they
    # are parsed all the same), so that `erase unlearn --help` stays short.
    finer = () if name in METHODS else OVERVIEW_HIDDEN
    add_dataclass_arguments(parser.add_argument_group(title), config_cls, skip=own + finer)
    if finer:
        add_dataclass_arguments(parser, config_cls, skip=tuple(n for n in COMMON if n not in finer) + own, hidden=True)
    if name in METHODS:
        add_dataclass_arguments(parser.add_argument_group(f"options of {name}"), config_cls, skip=COMMON)
        parser.chosen = ("--method", name)
    # Another method's option is then named as such, rather than as an unknown option.
    owners: dict[str, list[str]] = {}
    for other, method in METHODS.items():
        for f in dataclasses.fields(method.Config):
            if f.name not in COMMON and f.name not in own:
                owners.setdefault("--" + f.name.replace("_", "-"), []).append(other)
    parser.option_owners = owners


LEGACY = (("--ema-decay", float), ("--retain-target", str), ("--retain-reference", str), ("--retain-samples", str),
          ("--trajectories", int), ("--adversarial-every", int), ("--adversarial-steps", int),
          ("--adversarial-lr", float), ("--adversarial-radius", float))


def add_legacy_options(parser: argparse.ArgumentParser) -> None:
    """The deprecated term options, parsed but left out of the help."""
    for option, kind in LEGACY:
        parser.add_argument(option, type=kind, default=None, help=argparse.SUPPRESS)


def own_options(config_cls: type) -> str:
    own = [f.name for f in dataclasses.fields(config_cls) if f.name not in COMMON]
    return " ".join("--" + n.replace("_", "-") for n in own) or "(none)"


# Options that decide how a run goes, not what it makes: left out of the settings an output is compared by.
CONTROL_OPTIONS = ("out", "overwrite", "no_resume", "keep_checkpoints", "checkpoint_minutes", "report_to", "config",
                   "verbose", "command", "func", "output_kind")


def unlearn_command(args: argparse.Namespace, config) -> tuple[str, dict]:
    """The exact `erase unlearn` command of this run and the settings its output is compared by: every
    option given, a method's whole config written out (defaults and a --config file's values
    included, so a later change of a default does not change what the command makes), paths absolute."""
    from ..config import config_dict
    from ..outputs import command_line
    from ..resources import SHIPPED_MODELS

    values = {k: v for k, v in vars(args).items() if k not in CONTROL_OPTIONS and v is not None and v is not False}
    values.update(config_dict(config) if config is not None else {})
    for name, kind in (("model", "any"), ("forget", "dir"), ("retain", "file"), ("recipe", "file"),
                       ("retain_reference", "any")):
        value = values.get(name)
        if isinstance(value, str) and value not in SHIPPED_MODELS:
            found = Path(value).expanduser()
            if {"any": found.exists(), "dir": found.is_dir(), "file": found.is_file()}[kind]:
                values[name] = str(found.resolve())
    flags = sorted(k for k, v in values.items() if v is True and k == "no_anchor_in_retain")
    options = [("--" + k.replace("_", "-"), v) for k, v in values.items() if k not in flags]
    settings = json.loads(json.dumps({**dict(options), **{"--" + k.replace("_", "-"): True for k in flags}}))
    command = command_line("unlearn", options) + "".join(" --" + k.replace("_", "-") for k in flags)
    return f"{command} --out {shlex.quote(str(Path(args.out).expanduser().resolve()))}", settings


def cmd_unlearn(args: argparse.Namespace) -> None:
    from ..config import build_config
    from ..outputs import check_output, is_same_output, recording
    from ..unlearning.recipe import recipe_or_default
    from ..unlearning.terms import LEGACY_OPTIONS
    from ..utils import EraseError, logger

    legacy = {k: getattr(args, k) for k in LEGACY_OPTIONS if getattr(args, k, None) is not None}
    common = dict(retain=args.retain, anchor=args.anchor, dataset=args.dataset, images=args.images,
                  image_guidance=args.image_guidance, anchor_in_retain=False if args.no_anchor_in_retain else None,
                  resume=not args.no_resume, keep_checkpoints=args.keep_checkpoints, overwrite=args.overwrite,
                  report_to=args.report_to)
    if args.method is not None and args.recipe is not None:
        raise EraseError("give --method NAME (one stage) or --recipe NAME|FILE (`erase recipes`), not both")
    args.recipe = recipe_or_default(args.method, args.recipe)  # recorded as `--recipe forget`: the run says so
    common["checkpoint_minutes"] = args.checkpoint_minutes
    config = None
    if args.method is not None:
        config = build_config(_config_class(args.method),
                              {k: v for k, v in load_config_file(args.config).items() if k not in LEGACY_OPTIONS}, args)
    command, settings = unlearn_command(args, config)
    check_output(args.out, "unlearn", args.overwrite, inputs=[args.model], checkpoints=True, settings=settings)
    if not args.overwrite and is_same_output(args.out, "unlearn", settings):
        logger.info("%s is already the output of this command: reusing it (--overwrite runs it again)", args.out)
        print(f"{args.out} is already the output of this command (model, delta.safetensors, erase_config.json)")
        return
    with recording("unlearn", command, settings):
        _run_unlearn(args, legacy, common)


def _run_unlearn(args: argparse.Namespace, legacy: dict, common: dict) -> None:
    from ..config import build_config
    from ..unlearning import unlearn
    from ..unlearning.recipe import RUN_WIDE
    from ..unlearning.terms import LEGACY_OPTIONS
    from ..utils import EraseError

    if args.recipe is not None:
        given = sorted(k for k in COMMON if getattr(args, k, None) is not None and k not in RUN_WIDE)
        if given or args.config or legacy:
            wrong = ("--" + given[0].replace("_", "-")) if given else "--config" if args.config else "--" + next(iter(legacy))
            raise EraseError(f"{wrong}: a recipe sets each stage's options; copy the recipe (`erase recipes`) "
                             f"and change it there (a command line may set {', '.join(RUN_WIDE)})")
        out = unlearn(args.model, forget=args.forget, out=args.out, recipe=args.recipe,
                      **{k: getattr(args, k) for k in RUN_WIDE if getattr(args, k, None) is not None}, **common)
    else:
        method = EDITS[args.method] if args.method in EDITS else get_method(args.method)
        values = load_config_file(args.config)
        legacy = {**{k: values.pop(k) for k in LEGACY_OPTIONS if k in values}, **legacy}  # an older config file
        config = build_config(method.Config, values, args)
        out = unlearn(args.model, args.method, args.forget, args.out, config=config, **legacy, **common)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, every process returns here
        print(f"wrote {out} (model, delta.safetensors, erase_config.json)")


def _config_class(name: str) -> type:
    return EDITS[name].Config if name in EDITS else get_method(name).Config


def describe_defaults(config_cls: type) -> str:
    """The defaults a method changes from the common ones, plus its own fields."""
    common = {f.name: f.default for f in dataclasses.fields(MethodConfig)}
    parts = [f"{f.name}={'(depends on the parameter group, see --help)' if f.default is None and f.name == 'lr' else f.default}"
             for f in dataclasses.fields(config_cls) if f.name not in common or f.default != common[f.name]]
    return ", ".join(parts) or "the common defaults"


def cmd_methods(args: argparse.Namespace) -> None:
    common = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(MethodConfig))
    print(f"common defaults: {common}\n")
    for name, method in METHODS.items():
        print(f"{name:9s} {method.paper()}")
        print(f"{'':9s} params: {method.params_description()}; "
              f"forget share of each batch: {method.forget_share:g}")
        print(f"{'':9s} defaults: {describe_defaults(method.Config)}\n")
    print("closed-form edits (no images, no training loop: one solve on the text embeddings; "
          "--forget takes several concepts)\n")
    for name, edit in EDITS.items():
        defaults = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(edit.Config))
        print(f"{name:9s} {edit.paper()}")
        print(f"{'':9s} params: {edit.params_description()}")
        print(f"{'':9s} defaults: {defaults}\n")


def describe_stage(stage) -> str:
    parts = [stage.method] + [f"{k}={v}" for k, v in stage.config.items()]
    for name, term in stage.terms.to_dict().items():
        parts.append(f"+{name}(" + ", ".join(f"{k}={v}" for k, v in term.items()) + ")")
    parts += [f"data.{k}={v}" for k, v in stage.data.options().items()]
    return " ".join(parts)


def cmd_recipes(args: argparse.Namespace) -> None:
    from ..unlearning.recipe import load_recipe, shipped_recipes

    for name, path in shipped_recipes().items():
        recipe = load_recipe(path)
        print(f"{name} (version {recipe.version}, target {recipe.target}): {recipe.description}")
        for i, stage in enumerate(recipe.stages, 1):
            print(f"  stage {i}: {describe_stage(stage)}")
        provenance = recipe.provenance
        if provenance.get("measured"):
            print(f"  measured: {provenance['measured']}")
        if provenance.get("benchmarks"):
            print(f"  source: {provenance['benchmarks']}")
        print()


def add_commands(sub) -> None:
    methods = "\n".join(f"  {name:9s} {own_options(m.Config)}" for name, m in {**METHODS, **EDITS}.items())
    p = sub.add_parser("unlearn", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Erase classes or text concepts from a model. `erase unlearn --method NAME --help` "
                                   "shows every option\n(--weight-decay, --grad-clip, --antithetic too) with that "
                                   "method's defaults, and its own options.",
                       epilog=f"each method's own options (`erase methods` lists the methods and defaults):\n{methods}")
    p.options_depend_on("--method", add_method_options)
    p.add_argument("--model", required=True, help="model folder (from `erase train-base` or `erase unlearn`), a "
                                                  "diffusers pipeline folder, a .safetensors/.ckpt file or a hub id")
    p.add_argument("--method", choices=[*METHODS, *EDITS],
                   help="unlearning method (`erase methods`): a one-stage recipe; or a closed-form edit (uce, speed)")
    p.add_argument("--recipe", help="a shipped recipe (`erase recipes`) or a recipe file (JSON): runs its stages "
                                    "into OUT (default, without --method: forget, the recommended recipe)")
    p.add_argument("--forget", required=True,
                   help="class-conditional models: class ids or names, comma-separated (e.g. 3 or three,5); "
                        "Stable Diffusion: a concept name from prompts/ (nudity), a concept folder, or a prompt ('Van Gogh'), "
                        "or several erased at once: comma-separated names or folders (a miniature's class words: "
                        "three,five), a file of them, or a CSV in the mass-erasure layout (id,type,text,concept,seed); "
                        "each concept's loss is logged apart (forget_denoise.NAME)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--retain", help="classes to retain (default: every other class); Stable Diffusion: a "
                                    "prompt file or comma-separated prompts (default: the concept's retain.txt)")
    p.add_argument("--anchor", help="class each forget class is remapped to: one for all or one per forget "
                                    "class (default: (c + 1) mod K, skipping forgotten classes); Stable "
                                    "Diffusion: the anchor prompt (default: the concept's anchor.txt)")
    p.add_argument("--dataset", help="dataset of the forget/retain images (default: the model's training set)")
    p.add_argument("--images", type=int, help="Stable Diffusion: images generated and cached per set (forget, "
                                              "anchor, retain); default 800 as in SalUn and EUPMU")
    p.add_argument("--image-guidance", type=float,
                   help="Stable Diffusion: guidance scale of those images (default: the model's sampling "
                        "default, 7.5 for SD); 1 (no guidance) lowers unlearning's FID cost on the "
                        "miniature (BENCHMARKS.md, History)")
    p.add_argument("--no-anchor-in-retain", action="store_true",
                   help="Stable Diffusion: leave the anchor images out of the retain set (by default they join "
                        "it, SalUn's nudity recipe; beside a concept's own retain prompts they are half the "
                        "retain images; on the miniature leaving them out did not lower the FID cost over "
                        "seeds, BENCHMARKS.md, History)")
    p.add_argument("--config", help="JSON file of method options (command-line options override it)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT-checkpoints/ exists")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT-checkpoints/ after finishing")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="also write a checkpoint after this many minutes of training since the last one, whatever "
                        "--checkpoint-every says, so that an interrupt loses little (default 5)")
    p.add_argument("--report-to", help="also log every step's losses to accelerate trackers under OUT-logs/, e.g. "
                                       "tensorboard (comma-separated; each must be installed)")
    add_legacy_options(p)
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("recipes", description="The shipped recipes: stages, target, and what was measured.")
    p.set_defaults(func=cmd_recipes)
