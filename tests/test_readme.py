"""The README's commands match the command line: each `erase ...` it shows parses."""

import re
import shlex
from pathlib import Path

import pytest

from erase.cli import build_parser

README = Path(__file__).parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """Every `erase` invocation in the README's indented code blocks (continuations joined)."""
    text = README.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if not line.startswith("    "):
            continue
        for part in re.split(r"&&|;", line):
            tokens = shlex.split(part.split("#")[0])
            if "erase.cli" in tokens:  # accelerate launch ... -m erase.cli SUBCOMMAND ...
                commands.append(tokens[tokens.index("erase.cli") + 1:])
            elif tokens[:1] == ["erase"]:
                commands.append(tokens[1:])
    return commands


def test_the_readme_shows_the_main_commands():
    shown = {c[0] for c in readme_commands()}
    assert {"demo", "unlearn", "eval", "bench", "train-base", "train-classifier", "report"} <= shown


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a[:3]))
def test_readme_command_parses(argv):
    build_parser().parse_args(argv)  # argparse exits on an unknown option or a bad value
