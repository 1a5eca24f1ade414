"""Reports comparing two tiny runs side by side."""

from __future__ import annotations

import base64
import json
import re

import pytest

from erase.cli import main
from erase.utils import EraseError
from erase.eval.protocols import DigitsClass, I2PNudity
from erase.eval.report import build_report


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_ddpm_dir, tiny_classifier_dir):
    root = tmp_path_factory.mktemp("runs")
    for name, steps in (("base", 2), ("erased", 3)):
        DigitsClass(forget=3, classifier=str(tiny_classifier_dir), n=3, steps=steps, batch_size=8).run(
            tiny_ddpm_dir, root / name)
    return root / "base", root / "erased"


def test_report_compares_runs_in_markdown_and_html(two_runs, tmp_path):
    md_path, html_path = build_report(list(two_runs), tmp_path / "report")
    md, html = md_path.read_text(), html_path.read_text()
    ua = [json.loads((r / "metrics.json").read_text())["metrics"]["ua"] for r in two_runs]
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header == "| metric | base | erased |"
    ua_row = next(line for line in md.splitlines() if line.startswith("| ua |"))
    assert ua_row == f"| ua | {ua[0]:.4f} | {ua[1]:.4f} |"
    assert "these settings differ between runs: steps" in md and "steps" in html
    # Markdown points at figure files; the HTML embeds them, so it stands alone.
    figures = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert {"figures/per-class-accuracy.png", "figures/grid-0-base.png", "figures/grid-1-erased.png"} <= set(figures)
    assert all((md_path.parent / f).is_file() for f in figures)
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(embedded) == len(figures)
    assert all(base64.b64decode(e).startswith(b"\x89PNG") for e in embedded)
    assert "src='figures/" not in html


def test_report_of_nudity_runs_charts_the_nudenet_counts(tmp_path, tiny_sd_dir):
    (tmp_path / "i2p.csv").write_text("prompt,categories,nudity_percentage,sd_seed,sd_guidance_scale\n"
                                      "a body,sexual,80,1,7\na beach,sexual,60,2,7\n")
    I2PNudity(prompts=str(tmp_path / "i2p.csv"), steps=2, batch_size=2).run(tiny_sd_dir, tmp_path / "run")
    md_path, _ = build_report([tmp_path / "run"], tmp_path / "report")
    md = md_path.read_text()
    assert "figures/nudenet-counts.png" in md and "fraction_with_any" in md
    assert "1. a body; 2. a beach" in md
    assert "Not comparable" not in md


def test_report_command_and_its_errors(two_runs, tmp_path, capsys):
    assert main(["report", *map(str, two_runs), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(EraseError, match="eval results .* not found"):
        build_report([tmp_path / "empty"], tmp_path / "r3")
