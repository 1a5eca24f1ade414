"""`erase unlearn` and `erase methods`.

A method's options come from its config dataclass. `erase unlearn --help` lists the options every
method has (MethodConfig); the parser reads `--method` first, so `erase unlearn --method eupmu
--help` lists them with EUPMU's defaults, followed by the options of EUPMU alone.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..config import add_dataclass_arguments, load_config_file
from ..edits import EDITS
from . import METHODS, MethodConfig, get_method


COMMON = tuple(f.name for f in dataclasses.fields(MethodConfig))


def add_method_options(parser: argparse.ArgumentParser, name: str | None) -> None:
    """The options of every method (with `name`'s defaults when a method is named), then its own.
    A closed-form edit (`erase.edits`) has its own options only: it has no steps, batches or optimizer."""
    if name in EDITS:
        add_dataclass_arguments(parser.add_argument_group(f"options of {name} (a closed-form edit)"),
                                EDITS[name].Config)
        return
    config_cls = METHODS[name].Config if name in METHODS else MethodConfig
    own = tuple(f.name for f in dataclasses.fields(config_cls) if f.name not in COMMON)
    title = f"options of every method (defaults of {name})" if name in METHODS else "options of every method"
    add_dataclass_arguments(parser.add_argument_group(title), config_cls, skip=own)
    if name in METHODS:
        add_dataclass_arguments(parser.add_argument_group(f"options of {name}"), config_cls, skip=COMMON)


def own_options(config_cls: type) -> str:
    own = [f.name for f in dataclasses.fields(config_cls) if f.name not in COMMON]
    return " ".join("--" + n.replace("_", "-") for n in own) or "(none)"


def cmd_unlearn(args: argparse.Namespace) -> None:
    from ..config import build_config
    from ..loop import unlearn

    method = EDITS[args.method] if args.method in EDITS else get_method(args.method)
    config = build_config(method.Config, load_config_file(args.config), args)
    out = unlearn(args.model, args.method, args.forget, args.out, retain=args.retain, anchor=args.anchor,
                  dataset=args.dataset, images=args.images, image_guidance=args.image_guidance,
                  anchor_in_retain=False if args.no_anchor_in_retain else None,
                  config=config, resume=not args.no_resume,
                  keep_checkpoints=args.keep_checkpoints, overwrite=args.overwrite, report_to=args.report_to)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, every process returns here
        print(f"wrote {out} (model, delta.safetensors, erase_config.json)")


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


def add_commands(sub) -> None:
    methods = "\n".join(f"  {name:9s} {own_options(m.Config)}" for name, m in {**METHODS, **EDITS}.items())
    p = sub.add_parser("unlearn", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Erase classes or text concepts from a model. `erase unlearn --method NAME --help` "
                                   "shows the options\nwith that method's defaults, and its own options.",
                       epilog=f"each method's own options (`erase methods` lists the methods and defaults):\n{methods}")
    p.options_depend_on("--method", add_method_options)
    p.add_argument("--model", required=True, help="model folder (from `erase train-base` or `erase unlearn`), a "
                                                  "diffusers pipeline folder, a .safetensors/.ckpt file or a hub id")
    p.add_argument("--method", required=True, choices=[*METHODS, *EDITS],
                   help="unlearning method or closed-form edit (`erase methods`)")
    p.add_argument("--forget", required=True,
                   help="class-conditional models: class ids or names, comma-separated (e.g. 3 or three,5); "
                        "Stable Diffusion: a concept name from prompts/ (nudity), a concept folder, or a prompt ('Van Gogh'); "
                        "the edits (uce, speed) also take several: comma-separated names or folders, a file of "
                        "them, or a CSV in the mass-erasure layout (id,type,text,concept,seed)")
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
                        "miniature (BENCHMARKS.md section 7)")
    p.add_argument("--no-anchor-in-retain", action="store_true",
                   help="Stable Diffusion: leave the anchor images out of the retain set (by default they join "
                        "it, SalUn's nudity recipe; beside a concept's own retain prompts they are half the "
                        "retain images; on the miniature leaving them out did not lower the FID cost over "
                        "seeds, BENCHMARKS.md section 7)")
    p.add_argument("--config", help="JSON file of method options (command-line options override it)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT-checkpoints/ exists")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT-checkpoints/ after finishing")
    p.add_argument("--report-to", help="also log every step's losses to accelerate trackers under OUT-logs/, e.g. "
                                       "tensorboard (comma-separated; each must be installed)")
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("methods")
    p.set_defaults(func=cmd_methods)
