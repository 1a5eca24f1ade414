"""The argument parser of the `erase` command: argparse, with the habits of the Hugging Face scripts.

It imports nothing but argparse, so that `erase --help` answers at once: a command's options (which
come from config dataclasses in modules that import torch) are added only when that command is
parsed (`fill`). Two more conventions:

- option names accept underscores as well as dashes (`--batch_size` is `--batch-size`), and an
  on/off option a value (`--gradient-checkpointing false` is `--no-gradient-checkpointing`), as
  HfArgumentParser does;
- options may depend on another option's value (`options_depend_on`): `erase unlearn --method esd
  --help` lists ESD's own options, `erase eval --protocol i2p-nudity --help` that protocol's.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Sequence

from .suggest import nearest

# Names people bring from other tools, and the option that means the same here.
SYNONYMS = {"--learning-rate": "--lr", "--max-steps": "--steps", "--num-steps": "--steps", "--train-steps": "--steps",
            "--iterations": "--steps", "--train-batch-size": "--batch-size", "--output-dir": "--out",
            "--output": "--out", "--model-name-or-path": "--model", "--pretrained-model-name-or-path": "--model",
            "--concept": "--forget", "--erase": "--forget", "--num-images": "--n"}


def dashed(args: Sequence[str]) -> list[str]:
    """`--option_name[=value]` written as `--option-name[=value]`; values and short options untouched."""
    out = []
    for arg in args:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def boolean_values(args: Sequence[str], flags: set[str]) -> list[str]:
    """`--flag true|false` and `--flag=false` written as `--flag` / `--no-flag`, for the on/off `flags`."""
    out, i = [], 0
    while i < len(args):
        name, sep, value = args[i].partition("=")
        if name in flags and not sep and i + 1 < len(args) and args[i + 1].lower() in BOOLEAN_WORDS:
            value, sep, i = args[i + 1], "=", i + 1
        if name in flags and sep and value.lower() in BOOLEAN_WORDS:
            out.append(name if BOOLEAN_WORDS[value.lower()] else "--no-" + name[2:])
        else:
            out.append(args[i])
        i += 1
    return out


class EraseParser(argparse.ArgumentParser):
    """An ArgumentParser whose options may be filled in on first use and may depend on other options."""

    def __init__(self, *args, fill: Callable[[], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fill = fill  # adds this parser's options; called once, just before the first parse
        self._dependent: list[tuple[str, Callable[[EraseParser, str | None], None]]] = []

    def options_depend_on(self, option: str, add_options: Callable[[EraseParser, str | None], None]) -> None:
        """Before parsing, read `option`'s value from the command line and call `add_options(self, value)`
        (value None when the option is absent) to add the options it brings."""
        self._dependent.append((option, add_options))

    def parse_known_args(self, args=None, namespace=None):
        args = dashed(sys.argv[1:] if args is None else args)
        if self.fill is not None:
            fill, self.fill = self.fill, None
            fill()
        dependent, self._dependent = self._dependent, []
        for option, add_options in dependent:
            peek = argparse.ArgumentParser(add_help=False, exit_on_error=False)
            peek.add_argument(option, dest="value")
            try:
                value = peek.parse_known_args(args)[0].value
            except argparse.ArgumentError:  # e.g. the option without its value: the real parse says so
                value = None
            add_options(self, value)
        flags = {s for a in self._actions if isinstance(a, argparse.BooleanOptionalAction)
                 for s in a.option_strings if not s.startswith("--no-")}
        return super().parse_known_args(boolean_values(args, flags), namespace)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # said by the command's own parser, which knows its options
            sub = next((a.choices.get(getattr(parsed, a.dest, None)) for a in self._actions
                        if isinstance(a, argparse._SubParsersAction)), None)
            parser = sub if isinstance(sub, EraseParser) else self
            parser.error(parser.unknown_option_message(extras))
        return parsed

    def error(self, message: str):
        """One line, as every other error of the tool: the usage block is `--help`'s job."""
        hint = "" if "--help" in message else f" (`{self.prog} --help` lists the options)"
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice and (near := nearest(choice[1], re.findall(r"'([^']*)'", choice[2]), cutoff=0.6)):
            hint = f"; did you mean {near}?"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")

    #: option -> the methods or protocols that have it, for options of another choice than the one given
    option_owners: dict[str, list[str]] = {}
    #: ("--method", "eupmu"): the choice the owners are compared with, for the message
    chosen: tuple[str, str] | None = None

    def unknown_option_message(self, extras: list[str]) -> str:
        """The first unknown option with what it is: another method's or protocol's option, a known
        synonym, or the nearest option of this command; else argparse's own message."""
        option = next((e.partition("=")[0] for e in extras if e.startswith("--")), None)
        if option is None:
            return f"unrecognized arguments: {' '.join(extras)}"
        owners = self.option_owners.get(option)
        if owners and self.chosen:
            flag, name = self.chosen
            return (f"{option} is an option of {', '.join(owners)}, not of {name} "
                    f"(`{self.prog} {flag} {name} --help` lists the options of {name})")
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        near = SYNONYMS.get(option) if SYNONYMS.get(option) in known else nearest(option, known, cutoff=0.7)
        hint = f"; did you mean {near}?" if near else ""
        return f"unrecognized option {option}{hint}"


class CommandSlots:
    """Stands in for argparse's subparsers when a module's `add_commands(subparsers)` runs late:
    `add_parser(name, ...)` hands back the parser already registered under `name` (its one-line help
    is in `erase.cli.COMMANDS`, so that `erase --help` needs no module imported)."""

    def __init__(self, parsers: dict[str, EraseParser]):
        self.parsers = parsers

    def add_parser(self, name: str, **settings) -> EraseParser:
        parser = self.parsers[name]
        for key, value in settings.items():  # description, epilog, formatter_class
            setattr(parser, key, value)
        return parser
