"""Every subcommand's --help renders (argparse formats help strings, so a stray % breaks it)."""

import pytest

from erase.cli import build_parser, main


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", subcommands())
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: erase " + command in capsys.readouterr().out


def test_every_method_help_renders(capsys):
    from erase.methods import METHODS

    for name in METHODS:
        with pytest.raises(SystemExit):
            main(["unlearn", "--method", name, "--help"])
        assert f"options of {name}" in capsys.readouterr().out
