"""The shared shape of the `erase train-*` commands: `--out`, `--config FILE` and the options of the
trainer's config dataclass, with the command line overriding the file."""

from __future__ import annotations

from typing import Callable


def add_training_command(subparsers, name: str, config_cls: type, run: Callable, out_help: str):
    """Add `erase NAME`; `run(config, args)` trains. Returns the parser, for options of its own."""
    from ..config import add_dataclass_arguments, build_config, load_config_file

    def command(args) -> None:
        run(build_config(config_cls, load_config_file(args.config), args), args)

    p = subparsers.add_parser(name)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--config", help="JSON file of options (command-line options override it)")
    add_dataclass_arguments(p, config_cls)
    p.set_defaults(func=command)
    return p
