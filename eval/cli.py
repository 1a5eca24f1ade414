"""The `erase eval` and `erase report` commands, added to the `erase` parser by `add_commands`."""

from __future__ import annotations

import argparse
import dataclasses

from erase.config import add_dataclass_arguments, build_config
from erase.utils import EraseError


EVAL_DESCRIPTION = """\
Generate images with a model, measure them with a named protocol and write OUT/metrics.json
(every setting, the model, the feature extractor, package versions), OUT/index.json and OUT/images/.
To share the work between N processes run `torchrun --nproc_per_node N -m erase.cli -- eval ...`
(the `--` keeps torchrun from reading --n) or `accelerate launch --multi_gpu --num_processes N -m
erase.cli eval ...` (on CPUs too; accelerate's --cpu flag starts a single process): the images and
metrics are the same as one process's. `erase eval --protocol NAME --help` lists the options of
that protocol with its defaults (every setting is also written into metrics.json)."""


def add_protocol_options(parser: argparse.ArgumentParser, name: str | None) -> None:
    """The options of protocol `name`, with its defaults (none until a protocol is named). The other
    protocols' options are parsed too, out of the help, so that `protocol_options` can say which
    protocol an option belongs to rather than argparse's bare "unrecognized arguments"."""
    from erase.suggest import did_you_mean

    from .protocols import PROTOCOLS

    if name is None:
        return
    if name not in PROTOCOLS:  # said here, before the protocol's options are taken for unknown ones
        parser.error(f"unknown protocol {name}{did_you_mean(name, PROTOCOLS, cutoff=0.6)} (one of: {', '.join(PROTOCOLS)})")
    add_dataclass_arguments(parser.add_argument_group(f"options of {name}"), PROTOCOLS[name])
    added = {f.name for f in dataclasses.fields(PROTOCOLS[name])}
    for other in PROTOCOLS.values():
        add_dataclass_arguments(parser, other, skip=tuple(added), hidden=True)
        added |= {f.name for f in dataclasses.fields(other)}


def protocol_options(args: argparse.Namespace, protocol: type) -> None:
    """Refuse options that the chosen protocol does not have, rather than silently ignoring them."""
    from .protocols import PROTOCOLS

    own = {f.name for f in dataclasses.fields(protocol)}
    every = {f.name for p in PROTOCOLS.values() for f in dataclasses.fields(p)}
    stray = sorted(n for n in every - own if getattr(args, n, None) is not None)
    if stray:
        raise EraseError(f"option(s) {', '.join('--' + n.replace('_', '-') for n in stray)} do not apply to "
                         f"protocol {protocol.name}; its options are "
                         + ", ".join("--" + n.replace("_", "-") for n in sorted(own)))


def cmd_eval(args: argparse.Namespace) -> None:
    from .generation import process_state
    from .protocols import get_protocol

    protocol_cls = get_protocol(args.protocol)
    protocol_options(args, protocol_cls)
    protocol = build_config(protocol_cls, {}, args)
    results = protocol.run(args.model, args.out)
    if process_state().is_main_process:
        print(f"{protocol.name}: wrote {results['images']} images and metrics.json under {args.out}")
        metrics = results["metrics"]
        for key, value in metrics.items():
            if isinstance(value, dict) or key.endswith("_ci95"):
                continue
            if key == "fid" and metrics.get("fid_reliable") is False:
                print(f"  fid: n/a ({metrics['fid_samples']} images, fewer than the {metrics['fid_min_samples']} "
                      f"a full-rank covariance needs: {value:.4f} is not a result)")
                continue
            interval = metrics.get(f"{key}_ci95")
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            print(f"  {key}: {text}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""))


def cmd_report(args: argparse.Namespace) -> None:
    from .report import build_report

    md, html = build_report(args.runs, args.out)
    print(f"wrote {md} and {html}")


def add_commands(subparsers) -> None:
    """Add `eval` and `report` to the `erase` command's subparsers."""
    from .protocols import PROTOCOLS

    protocols = "\n".join(f"  {name:15s} {(p.__doc__ or '').strip().splitlines()[0]}" for name, p in PROTOCOLS.items())
    p = subparsers.add_parser("eval", description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=f"protocols (`erase eval --protocol NAME --help` for the options of one):\n{protocols}")
    p.add_argument("--model", required=True, help="model folder (class-conditional DDPM or Stable Diffusion pipeline)")
    p.add_argument("--protocol", required=True, help=f"one of: {', '.join(PROTOCOLS)}")
    p.add_argument("--out", required=True, help="run folder to write: metrics.json, index.json, images/")
    p.options_depend_on("--protocol", add_protocol_options)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("report")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by `erase eval`")
    p.add_argument("--out", required=True, help="report folder: report.md, report.html and the figures")
    p.set_defaults(func=cmd_report)
