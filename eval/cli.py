"""The `erase eval` and `erase report` commands, added to the `erase` parser by `add_commands`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

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

    from .registry import PROTOCOLS

    if name is None:
        return
    if name not in PROTOCOLS:  # said here, before the protocol's options are taken for unknown ones
        parser.error(f"unknown protocol {name!r}{did_you_mean(name, PROTOCOLS, cutoff=0.6)} (one of: {', '.join(PROTOCOLS)})")
    add_dataclass_arguments(parser.add_argument_group(f"options of {name}"), PROTOCOLS[name])
    added = {f.name for f in dataclasses.fields(PROTOCOLS[name])}
    for other in PROTOCOLS.values():
        add_dataclass_arguments(parser, other, skip=tuple(added), hidden=True)
        added |= {f.name for f in dataclasses.fields(other)}


def protocol_options(args: argparse.Namespace, protocol: type) -> None:
    """Refuse options that the chosen protocol does not have, rather than silently ignoring them."""
    from .registry import PROTOCOLS

    own = {f.name for f in dataclasses.fields(protocol)}
    every = {f.name for p in PROTOCOLS.values() for f in dataclasses.fields(p)}
    stray = sorted(n for n in every - own if getattr(args, n, None) is not None)
    if stray:
        raise EraseError(f"option(s) {', '.join('--' + n.replace('_', '-') for n in stray)} do not apply to "
                         f"protocol {protocol.name}; its options are "
                         + ", ".join("--" + n.replace("_", "-") for n in sorted(own)))


SHIPPED_CLASSIFIER = "digits-classifier"


def default_classifier(protocol_name: str, classifier: str | None) -> str | None:
    """The digits protocols measure with the shipped digits classifier unless told otherwise; a
    shipped model's name is accepted for any classifier, as in Python."""
    from erase.resources import model_location

    if classifier is None and protocol_name.startswith("digits-"):
        classifier = SHIPPED_CLASSIFIER
    return None if classifier is None else str(model_location(classifier))


def warn_if_other_concept(model: str, forget) -> None:
    """An eval of another class or concept than the model erased measures something else: say so."""
    from erase.outputs import UNLEARN_CONFIG
    from erase.resources import model_location
    from erase.utils import logger, read_json

    summary = Path(model_location(model)) / UNLEARN_CONFIG
    if forget is None or not summary.is_file():
        return
    data = read_json(summary, what="unlearning summary").get("data", {})
    erased = data.get("forget") or [data.get("concept", {}).get("name")]  # class names, or the concept's name
    erased_words = {str(e).lower() for e in erased if e is not None} | {str(c) for c in data.get("forget_ids", [])}
    given = {w.strip().lower() for w in str(forget).split(",") if w.strip()}
    if erased_words and not given & erased_words:
        logger.warning("--forget %s differs from what %s erased (%s): the numbers measure another concept",
                       forget, model, ", ".join(map(str, erased)))


def eval_command(model: str, protocol, out: str | Path) -> tuple[str, dict]:
    """The exact `erase eval` command (every setting of the protocol written out) and what it is compared by."""
    from erase.config import config_dict
    from erase.outputs import absolute_if_path, command_line
    from erase.resources import SHIPPED_MODELS

    settings = {"--model": model if model in SHIPPED_MODELS else absolute_if_path(model), "--protocol": protocol.name,
                **{"--" + k.replace("_", "-"): absolute_if_path(v) if k in PATH_SETTINGS else v
                   for k, v in config_dict(protocol).items() if v is not None}}
    settings = json.loads(json.dumps(settings))
    command = command_line("eval", list(settings.items()) + [("--out", str(Path(out).expanduser().resolve()))])
    return command, settings


# Protocol settings that name files or folders: recorded as absolute paths.
PATH_SETTINGS = ("classifier", "prompts", "reference", "reference_model", "clip_model", "data_root", "fid_weights")


def evaluate_recorded(protocol, model: str, out: str | Path, overwrite: bool = False) -> tuple[dict, bool]:
    """Run `protocol` on `model` into `out`, recording the command; an earlier output of exactly
    this command is reused, one of other settings refused. Returns (results, reused)."""
    from erase.outputs import check_output, is_same_output, recording
    from erase.utils import logger, read_json

    from .protocols import METRICS_FILE

    from erase.resources import model_location

    command, settings = eval_command(model, protocol, out)
    model = str(model_location(model))  # a shipped model's name recorded, its folder evaluated
    check_output(out, "eval", overwrite, inputs=[model], settings=settings)
    if not overwrite and is_same_output(out, "eval", settings) and (Path(out) / METRICS_FILE).is_file():
        logger.info("%s is already the output of this command: reusing it (--overwrite runs it again)", out)
        return read_json(Path(out) / METRICS_FILE, what="eval results"), True
    warn_if_other_concept(model, getattr(protocol, "forget", None))
    with recording("eval", command, settings):
        return protocol.run(model, out), False


def cmd_eval(args: argparse.Namespace) -> None:
    from .generation import process_state
    from .registry import get_protocol

    protocol_cls = get_protocol(args.protocol)
    protocol_options(args, protocol_cls)
    if hasattr(args, "classifier") and "classifier" in {f.name for f in dataclasses.fields(protocol_cls)}:
        args.classifier = default_classifier(protocol_cls.name, args.classifier)
    protocol = build_config(protocol_cls, {}, args)
    results, _ = evaluate_recorded(protocol, args.model, args.out, args.overwrite)
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


def report_recorded(runs: list, out: str | Path, overwrite: bool = False, **options) -> tuple[Path, Path]:
    """`build_report`, recording the exact `erase report` command; other runs over an earlier report are refused."""
    from erase.outputs import check_output, command_line, recording

    from .report import build_report

    paths = [str(Path(r).expanduser().resolve()) for r in runs]
    target = options.get("target")
    settings = {"runs": paths} | ({"target": dataclasses.asdict(target)} if target is not None else {})
    target_options = [] if target is None else [("--min-in-distribution", target.in_distribution)] + [
        ("--outcome", f"{run}={outcome}") for run, outcome in target.outcomes.items()]
    command = command_line("report", [("", p) for p in paths] + [("--out", str(Path(out).expanduser().resolve()))]
                           + target_options)
    check_output(out, "report", overwrite, inputs=paths, settings=settings)
    with recording("report", command, settings):
        return build_report(runs, out, **options)


def report_target(args: argparse.Namespace):
    """The report's target from `--min-in-distribution` and the `--outcome RUN_DIR=OUTCOME` declarations."""
    from .report import Target

    outcomes = {}
    for item in args.outcome or []:
        run, sep, outcome = item.partition("=")
        if not sep or not run or not outcome:
            raise EraseError(f"--outcome {item!r}: write RUN_DIR=OUTCOME, e.g. runs/eval-eupmu=anchor")
        outcomes[Path(run).name] = outcome
    return Target(in_distribution=args.min_in_distribution, outcomes=outcomes)


def cmd_report(args: argparse.Namespace) -> None:
    md, html = report_recorded(args.runs, args.out, args.overwrite, target=report_target(args))
    print(f"wrote {md} and {html}")


def add_commands(subparsers) -> None:
    """Add `eval` and `report` to the `erase` command's subparsers."""
    from .registry import PROTOCOLS

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
    p.add_argument("--min-in-distribution", type=float, default=0.5,
                   help="share of the erased class's images that must lie among real data for a verdict of "
                        "'erased' (default 0.5; real held-out images score 0.95)")
    p.add_argument("--outcome", action="append", metavar="RUN_DIR=OUTCOME",
                   help="declare what a run's erased prompt is meant to draw when not real data (e.g. a blank "
                        "image): its verdict then does not require the in-distribution score; repeatable")
    p.set_defaults(func=cmd_report)
