"""`erase demo` end to end on the shipped models, shortened (the full demo is the README's first command)."""

import json

import pytest

from erase.cli import main


@pytest.mark.slow
def test_demo_erases_from_both_models_and_writes_one_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--methods", "eupmu", "--steps", "3", "--n", "2", "--n-forget", "4",
            "--prompt-images", "1", "--concept-images", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report' / 'report.html'}" in printed
    for model in ("digits-ddpm", "mini-sd"):
        for name in ("original", "eupmu"):
            assert (out / model / "eval" / name / "metrics.json").is_file()
    assert json.loads((out / "digits-ddpm" / "models" / "eupmu" / "erase_config.json").read_text())["steps"] == 3
    md = (out / "report" / "report.md").read_text()
    assert "## Digits DDPM: digit 3 erased" in md and "## Miniature Stable Diffusion" in md
    assert "(figures/1-per-class-accuracy.png)" in md and "(figures/2-per-class-accuracy.png)" in md
    for section in (1, 2):  # each model: the trade-off plot, the loss curves, a grid row per digit
        assert f"(figures/{section}-tradeoff.png)" in md and f"(figures/{section}-loss-curves.png)" in md
    assert "| metric | original | eupmu | " in md  # columns named by method
    html = (out / "report" / "report.html").read_text()
    assert html.count("<img") == md.count("](figures/") == 2 * (10 * 2 + 3)  # the HTML embeds every figure

    # Run again: every finished step is reused, nothing is retrained.
    stamp = (out / "digits-ddpm" / "models" / "eupmu" / "erase_config.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "digits-ddpm" / "models" / "eupmu" / "erase_config.json").stat().st_mtime_ns == stamp


def test_demo_refuses_an_unknown_method(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--methods", "eupmu,nope"]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
