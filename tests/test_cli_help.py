"""The command line: every --help renders, and the conventions of the tools around it hold
(--flag/--no-flag, underscores or dashes, help per method and per protocol, --version, a light
`erase --help`, `python -m erase.cli` from any folder)."""

import subprocess
import sys
from pathlib import Path

import pytest

import erase
from erase.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", subcommands())
def test_help_renders(command, capsys):
    assert "usage: erase " + command in help_of([command], capsys)


def test_every_method_help_lists_the_common_options_with_its_defaults_and_its_own(capsys):
    from erase.methods import METHODS

    for name, method in METHODS.items():
        out = help_of(["unlearn", "--method", name], capsys)
        assert f"options of every method (defaults of {name})" in out
        assert "--steps" in out and "--batch-size" in out and "--gradient-checkpointing" in out
        for option in vars(method.Config()):
            assert "--" + option.replace("_", "-") in out, (name, option)
    esd_help = " ".join(help_of(["unlearn", "--method", "esd"], capsys).split())  # as wrapped to the terminal
    assert "5e-2 for a class embedding" in esd_help  # ESD's own lr help


def test_unlearn_help_without_a_method_lists_the_common_options_and_each_methods_own(capsys):
    out = help_of(["unlearn"], capsys)
    for option in ("--steps", "--lr", "--batch-size", "--no-gradient-checkpointing", "--mixed-precision"):
        assert option in out
    assert "--w-lr" in out.split("each method's own options")[1]  # named in the list, not offered as an option
    assert "--w-lr W_LR" not in out


def test_eval_help_lists_the_protocols_and_each_protocol_its_own_options(capsys):
    from erase.eval.registry import PROTOCOLS

    out = help_of(["eval"], capsys)
    assert all(name in out for name in PROTOCOLS) and "--subset" not in out
    out = help_of(["eval", "--protocol", "i2p-nudity"], capsys)
    assert "options of i2p-nudity" in out and "--subset" in out and "--row-guidance" in out
    assert "--n-forget" not in out  # a digits-class option (refused with a clear error: test_eval_protocols.py)


def test_booleans_are_flags_and_underscores_equal_dashes():
    base = ["unlearn", "--model", "m", "--method", "eupmu", "--forget", "3", "--out", "o"]
    parse = build_parser().parse_args
    assert parse(base).gradient_checkpointing is None  # unset: the config's default (or a config file) decides
    assert parse(base + ["--gradient-checkpointing"]).gradient_checkpointing is True
    assert parse(base + ["--no-gradient-checkpointing"]).gradient_checkpointing is False
    args = parse(base + ["--batch_size", "4", "--w_lr=2", "--gradient_checkpointing", "--keep_checkpoints"])
    assert (args.batch_size, args.w_lr, args.gradient_checkpointing, args.keep_checkpoints) == (4, 2.0, True, True)
    assert parse(["demo", "--no-mini-sd"]).mini_sd is False
    # HfArgumentParser's habit: an on/off option with a value
    assert parse(base + ["--gradient_checkpointing", "True"]).gradient_checkpointing is True
    assert parse(base + ["--gradient-checkpointing", "false", "--antithetic=no"]).antithetic is False
    assert parse(base + ["--gradient-checkpointing", "false"]).gradient_checkpointing is False
    with pytest.raises(SystemExit):
        parse(base + ["--gradient-checkpointing=maybe"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"erase {erase.__version__}"


def test_methods_lists_defaults_for_every_method(capsys):
    from erase.edits import EDITS
    from erase.methods import METHODS

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    defaults = [line.split("defaults:", 1)[1].strip() for line in lines if line.strip().startswith("defaults:")]
    assert len(defaults) == len(METHODS) + len(EDITS) and all(defaults)


def test_top_level_help_imports_neither_torch_nor_diffusers():
    code = ("import sys\nfrom erase.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("[]"), result.stdout[-500:]


def test_module_entry_point_works_from_a_folder_holding_eval_py(tmp_path):
    (tmp_path / "eval.py").write_text("raise SystemExit('the stray eval.py was imported')\n")
    result = subprocess.run([sys.executable, "-m", "erase.cli", "eval", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: erase eval" in result.stdout and "digits-prompts" in result.stdout
