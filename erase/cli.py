"""The `erase` command. Each subcommand is a small function; options come from config dataclasses."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import traceback

from . import __version__
from .parser import CommandSlots, EraseParser

# Options whose values are paths a command reads: its --out may be none of them (nor inside or around one).
INPUT_OPTIONS = ("model", "classifier", "prompts", "reference", "clip_model", "config", "runs", "retain",
                 "dataset", "data_root", "fid_weights")


def parse_classes(text: str) -> list[str]:
    from .utils import EraseError

    items = [c.strip() for c in text.split(",") if c.strip()]
    if not items:
        raise EraseError("--classes needs at least one class id or name, e.g. --classes 0,3,7")
    return items


def check_sample_options(args: argparse.Namespace) -> None:
    """Every `erase sample` option checked before the model is loaded."""
    import math

    from .utils import EraseError

    for name in ("n", "steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EraseError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("guidance", "eta"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise EraseError(f"--{name} must be a finite number >= 0, got {value}")


def cmd_sample(args: argparse.Namespace) -> None:
    from .backbones import load_backbone
    from .sampling import save_class_samples
    from .utils import EraseError, resolve_device, warn_if_costly

    check_sample_options(args)
    device = resolve_device(args.device)
    classes = parse_classes(args.classes) if args.classes else None
    model = load_backbone(args.model).to(device)
    if model.condition_kind != "class":
        raise EraseError(f"{args.model} is not a class-conditional model: `erase sample` draws classes; "
                         "use `erase eval` with a prompt protocol for a text-to-image pipeline")
    classes = classes or list(range(model.num_classes))
    ids = [model.class_index(c) for c in classes]  # an unknown class is refused before sampling
    defaults = model.sample_defaults
    steps = defaults["steps"] if args.steps is None else args.steps
    warn_if_costly("sample", args.n * len(ids), steps)
    out = save_class_samples(model, ids, args.n, args.out, steps=steps,
                             guidance=defaults["guidance"] if args.guidance is None else args.guidance,
                             eta=defaults["eta"] if args.eta is None else args.eta,
                             seed=args.seed,
                             batch_size=args.batch_size or model.choose_batch_size(ids[0], cpu_batch=64))
    print(f"wrote {args.n * len(classes)} images and grid.png under {out}")


def add_commands(subparsers) -> None:
    """The command defined in this module: sample."""
    p = subparsers.add_parser("sample")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--classes", help="comma-separated class ids or names (default: all)")
    p.add_argument("--n", type=int, default=16, help="images per class (default 16)")
    p.add_argument("--out", required=True, help="output folder: OUT/<class>/<index>.png and OUT/grid.png")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the model's sample_defaults, else 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale s of ε_∅ + s(ε_c − ε_∅) (default: the model's sample_defaults, else 3.0)")
    p.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, 1 DDPM-like (default: the model's, else 0)")
    p.add_argument("--seed", type=int, default=0, help="image i of class c gets a seed derived from (seed, c, i)")
    p.add_argument("--batch-size", type=int, help="images per UNet call (default: 64 on a CPU, on a GPU the largest that fits from 64 down; index.json records it: results depend on it only through float rounding)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=cmd_sample)


# Every command: the module whose `add_commands` defines its options, and its one-line help. The
# module is imported only when its command is parsed, so `erase --help` imports neither torch nor diffusers.
COMMANDS = {
    "demo": ("erase.demo", "erase a digit from both shipped models, evaluate, write a report"),
    "unlearn": ("erase.methods.cli", "erase classes or concepts from a model with a method or a recipe"),
    "methods": ("erase.methods.cli", "list the unlearning methods with their papers and defaults"),
    "recipes": ("erase.methods.cli", "list the shipped recipes: stages, target, measured figures"),
    "eval": ("erase.eval.cli", "evaluate a model with a named protocol (writes OUT/metrics.json)"),
    "report": ("erase.eval.cli", "compare eval runs side by side (Markdown + self-contained HTML)"),
    "export": ("erase.export", "a finished run as a diffusers or WebUI LoRA, or a single-file checkpoint"),
    "bench": ("erase.bench.run", "per-method step cost vs finetune, peak memory, generation throughput"),
    "sample": ("erase.cli", "generate images of some classes from a class-conditional model"),
    "train-base": ("erase.training.train_base", "train a class-conditional DDPM (digits, cifar10, folder:PATH)"),
    "train-classifier": ("erase.training.classifier", "train the classifier used for unlearning accuracy and feature FID"),
    "train-mini-sd": ("erase.training.mini_sd", "train the miniature Stable Diffusion on captioned digits"),
    "train-mini-flow": ("erase.training.mini_flow", "train the miniature SD3 (flow matching) on captioned digits"),
}


def _fill_module_commands(module: str, parsers: dict[str, EraseParser]) -> None:
    """Import `module` and let its `add_commands` add the options of every command it defines."""
    names = [name for name, (owner, _) in COMMANDS.items() if owner == module]
    for name in names:
        parsers[name].fill = None
    own = {name: parsers[name] for name in names}
    importlib.import_module(module).add_commands(CommandSlots(own))
    add_overwrite_options(own)


def build_parser() -> EraseParser:
    parser = EraseParser(prog="erase", description="Concept erasure (machine unlearning) for diffusion models. "
                                                   "`erase COMMAND --help` lists a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; full tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=EraseParser)
    parsers: dict[str, EraseParser] = {}
    for name, (module, help_text) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_text, description=help_text,
                                       fill=functools.partial(_fill_module_commands, module, parsers))
    return parser


def add_overwrite_options(parsers: dict[str, EraseParser]) -> None:
    """`--overwrite` on every command that writes an `--out` folder, which is then checked before work starts."""
    for name, p in parsers.items():
        if any("--out" in a.option_strings for a in p._actions):
            p.add_argument("--overwrite", action="store_true",
                           help="replace --out even if it holds files this command did not write")
            p.set_defaults(output_kind=name)


def check_out(args: argparse.Namespace) -> None:
    from .outputs import check_output

    if getattr(args, "output_kind", None) is None:
        return
    inputs = []
    for name in INPUT_OPTIONS:
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        inputs += [v.removeprefix("folder:") for v in values if isinstance(v, str)]
    check_output(args.out, args.output_kind, args.overwrite, inputs=inputs,
                 checkpoints=args.output_kind in ("unlearn", "train-base"))


def resume_hint(args: argparse.Namespace, argv: list[str] | None) -> str:
    """How to go on after Ctrl-C: the exact command again (an unlearning run resumes from its last
    checkpoint; other commands start over, keeping what they cache)."""
    import shlex

    from .outputs import last_command

    command = last_command() or shlex.join(["erase", *(sys.argv[1:] if argv is None else argv)])
    if args.command == "unlearn":
        ckpt = f"{args.out.rstrip('/')}-checkpoints"
        return f"to resume from the last checkpoint in {ckpt}, run: {command}"
    return f"to run it again, run: {command}"


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .utils import EraseError, logger, setup_logging

    setup_logging(args.verbose)
    from .outputs import _LAST_COMMAND

    _LAST_COMMAND.clear()  # an interrupt names this command, not an earlier one of the same process
    try:
        check_out(args)
        args.func(args)
    except EraseError as e:
        logger.debug("details", exc_info=True)
        print(f"erase {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"erase {args.command}: interrupted; {resume_hint(args, argv)}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a failure nobody foresaw still gets one line; -v shows where
        if args.verbose:
            traceback.print_exc()
        kind = "error" if isinstance(e, OSError) else f"unexpected error ({type(e).__name__})"
        hint = "" if args.verbose else f" (rerun as `erase -v {args.command} ...` for the traceback)"
        print(f"erase {args.command}: {kind}: {one_line(e)}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
