"""`erase demo` end to end on the shipped models, shortened (the full demo is the README's first command)."""

import json

import pytest

from erase.cli import main


@pytest.mark.slow
def test_demo_erases_attacks_and_writes_one_report(tmp_path, monkeypatch, capsys):
    """The demo from the command line, with --attacks: the original, the retrained model and the erased
    one evaluated and attacked, one report with a robustness section per model, and a rerun that reuses
    every finished step."""
    from erase import demo

    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    # The demo's attacks at a few steps each (their real budgets take minutes per model); one worker
    # process, so that the shortened budgets are the ones the parts read.
    monkeypatch.setattr(demo, "ATTACKS", {
        "digits-ddpm": {"attack-class-inversion": {"steps": 2, "attack_steps": 2, "attack_batch": 4, "train_images": 8}},
        "mini-sd": {"attack-concept-inversion": {"steps": 2, "attack_steps": 2, "attack_batch": 2, "train_images": 2},
                    "attack-ring-a-bell": {"steps": 2}}})
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "3", "--n", "2", "--n-forget", "4",
            "--prompt-images", "1", "--concept-images", "4", "--workers", "1", "--attacks", "--attack-units", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report' / 'report.html'}" in printed
    assert f"robustness table: {out / 'robustness.md'}" in printed
    recipes = {"digits-ddpm": "forget", "mini-sd": "forget"}  # the recommended one, the same file on both
    for model, recipe in recipes.items():
        for name in ("original", "retrained", recipe):
            assert (out / model / "eval" / name / "metrics.json").is_file()
        record = json.loads((out / model / "models" / recipe / "erase_config.json").read_text())
        assert record["recipe"]["name"] == recipe and all(s["steps"] == 3 for s in record["stages"])

    for key, attacks in demo.ATTACKS.items():
        for name in ("original", "retrained", recipes[key]):
            for attack in attacks:
                assert json.loads((out / key / "attacks" / attack / name / "metrics.json").read_text())[
                    "metrics"]["units"] == 2
        # the distance of the original and the erased model to the retrained one, from the same seeds
        for name in ("original", recipes[key]):
            m = json.loads((out / key / "distance" / name / "metrics.json").read_text())["metrics"]
            assert 0 <= m["forget_verdict_distance_vs_reference"] <= 1 and m["fid_vs_reference"] >= 0
        assert not (out / key / "distance" / "retrained").exists()
    table = (out / "robustness.md").read_text()
    assert table.count("| retrained | 100.0% |") == 2  # a model that never saw a 3 does not draw one when asked
    erased = json.loads((out / "mini-sd" / "attacks" / "attack-ring-a-bell" / "forget" / "metrics.json").read_text())
    rows = [line for line in table.splitlines() if line.startswith("| forget |")]  # the DDPM's, then the mini-SD's
    row = rows[1]
    assert row.count("|") == 8  # the mini-SD row: 3 + 2 attacks + 2 distances
    assert f"**{100 * erased['metrics']['post_attack_success']:.1f}%**" in row
    # beside the rate, how many units the attack broke with an image that is a digit at all
    assert f"among data {100 * erased['metrics']['post_attack_success_in_distribution']:.1f}%" in row

    md = (out / "report" / "report.md").read_text()
    assert "## Digits DDPM: digit 3 erased" in md and "## Miniature Stable Diffusion" in md
    assert md.count("### Robustness") == 2 and "| retrained |" in md
    assert "(figures/1-per-class-accuracy.png)" in md and "(figures/2-per-class-accuracy.png)" in md
    for section in (1, 2):  # each model: the trade-off plot, the loss curves, a grid row per digit
        assert f"(figures/{section}-tradeoff.png)" in md and f"(figures/{section}-loss-curves.png)" in md
    assert "| metric | original | retrained | forget | " in md  # columns named by model
    # each erased run is judged against its recipe's target, the retrained model in the same section
    assert "meets the target (forget)" in md or "misses the target (forget)" in md
    html = (out / "report" / "report.html").read_text()
    # the HTML embeds every figure: per model a grid row per digit and model and 3 plots, and each
    # attack's samples before and after for each model (1 attack on the DDPM, 2 on the mini-SD)
    assert html.count("<img") == md.count("](figures/") == 2 * (10 * 3 + 3) + (1 + 2) * 3 * 2

    # Run again: every finished step is reused, nothing is retrained or attacked again.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "digits-ddpm" / "models" / recipes["digits-ddpm"] / "erase_config.json",
                                                out / "mini-sd" / "attacks" / "attack-ring-a-bell" / "forget" / "metrics.json")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_demo_parts_in_two_processes_give_the_same_images_and_numbers(tmp_path, monkeypatch):
    """The demo's parts run in parallel worker processes; the result must be the one-process result, bit for bit."""
    from erase.demo import DemoConfig, run_demo

    results = {}
    for workers in (1, 2):
        monkeypatch.setenv("ERASE_CACHE", str(tmp_path / f"cache-{workers}"))  # each run generates its concept data
        config = DemoConfig(methods="eupmu", steps=3, n=2, n_forget=4, prompt_images=1, concept_images=4,
                            workers=workers)
        out = tmp_path / f"demo-{workers}"
        results[workers] = run_demo(config, out)["rows"]
        images = sorted(p.relative_to(out) for p in out.glob("*/eval/*/images/**/*.png"))
        assert len(images) == 3 * (9 * 2 + 4) + 3 * (10 * 11)  # per model: original, retrained and eupmu
        results[workers, "images"] = {p: (out / p).read_bytes() for p in images}
    assert results[1] == results[2]
    assert results[1, "images"] == results[2, "images"]


def test_demo_refuses_an_unknown_method(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--methods", "eupmu,nope"]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
