"""Reports: method-named columns, intervals, deltas, verdicts, figures, relative paths, and the HTML in a real browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from erase.cli import main
from erase.eval.protocols import DigitsClass, I2PNudity
from erase.eval.report import Target, build_report
from erase.loop import unlearn
from erase.utils import EraseError

REPO = Path(__file__).resolve().parents[1]
ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(tmp|work|root|home|usr)/")


def _table_rows(md: str, first_cell: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {first_cell}"))


def test_report_names_columns_by_method_with_intervals_deltas_and_verdicts(two_runs, tmp_path):
    md_path, html_path = build_report(list(two_runs), tmp_path / "report")
    md, html = md_path.read_text(), html_path.read_text()
    ga = json.loads((two_runs[1] / "metrics.json").read_text())["metrics"]
    original = json.loads((two_runs[0] / "metrics.json").read_text())["metrics"]
    assert _table_rows(md, "metric") == "| metric | original | ga | "
    assert _table_rows(md, "steps") == "| steps | — | 4 | "
    assert _table_rows(md, "learning rate") == "| learning rate | — | 0.001 | "
    ua = _table_rows(md, "UA")
    lo, hi = ga["ua_ci95"]
    original_ua = 1 - original["per_class_accuracy"]["three"]  # the original's UA on the erased class
    assert f"{ga['ua']:.3f} [{lo:.3f}, {hi:.3f}] ({ga['ua'] - original_ua:+.3f})" in ua
    assert "(↑ higher is better)" in ua and "(↓ lower is better)" in _table_rows(md, "FID")
    assert "neighbours: " in md and _table_rows(md, "neighbour accuracy")
    # Descriptors are notes, not metrics.
    assert "| forget_class" not in md and "| fid_samples" not in md
    assert re.search(r"- \*\*ga\*\*: (meets|misses) the target|- \*\*ga\*\*: undecided", md)
    # The settings table is there although every setting is the same; the commands behind each column.
    assert _table_rows(md, "n ") == "| n | 3 | 3 | " and "Not comparable" not in md
    assert "`erase unlearn --model " in md and "--forget 3 --method ga" in md and "--steps 4" in md
    assert "erase eval --model " in md and "--protocol digits-class" in md
    assert not ABSOLUTE_PATH.search(md) and not ABSOLUTE_PATH.search(html)
    # Markdown points at figure files; the HTML embeds them, so it stands alone.
    figures = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert {"figures/1-tradeoff.png", "figures/1-per-class-accuracy.png", "figures/1-loss-curves.png"} <= set(figures)
    assert all((md_path.parent / f).is_file() for f in figures)
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == len(figures) and all(base64.b64decode(e).startswith(b"\x89PNG") for e in embedded)
    # Grids: a labelled row per class, one column per run.
    assert _table_rows(md, "three").count("figures/1-grid-") == 2


def test_report_refuses_to_present_an_fid_from_too_few_images(two_runs, tmp_path):
    flagged = tmp_path / "ga-few"
    shutil.copytree(two_runs[1], flagged)
    results = json.loads((flagged / "metrics.json").read_text())
    results["metrics"] |= {"fid_reliable": False, "fid_samples": 45, "fid_min_samples": 128}
    (flagged / "metrics.json").write_text(json.dumps(results))
    md = build_report([two_runs[0], flagged], tmp_path / "report")[0].read_text()
    fid = _table_rows(md, "FID")
    assert "n/a: 45 images < 128" in fid and f"{results['metrics']['fid']:.3f}" not in fid


def test_report_shows_the_distance_to_the_reference_model(two_runs, tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    measured = tmp_path / "ga-vs-reference"
    DigitsClass(forget=3, classifier=str(tiny_classifier_dir), n=3, steps=2, batch_size=8, fid_bootstrap=20,
                reference_model=str(tiny_ddpm_dir)).run(two_runs[1].parent / "models" / "ga", measured)
    metrics = json.loads((measured / "metrics.json").read_text())["metrics"]
    md = build_report([two_runs[0], measured], tmp_path / "report")[0].read_text()
    row = _table_rows(md, "erased class: verdicts' distance to the reference")
    assert "lower is better" in row and f"{metrics['forget_verdict_distance_vs_reference']:.3f}" in row
    fid = _table_rows(md, "FID of retained-class images against the reference")
    assert metrics["fid_vs_reference_reliable"] and f"{metrics['fid_vs_reference']:.3f}" in fid
    # Too few images for the feature dimension: flagged like the plain FID, not shown.
    metrics |= {"fid_vs_reference_reliable": False, "fid_vs_reference_samples": 27}
    results = json.loads((measured / "metrics.json").read_text()) | {"metrics": metrics}
    (measured / "metrics.json").write_text(json.dumps(results))
    md = build_report([two_runs[0], measured], tmp_path / "report-flagged")[0].read_text()
    assert "n/a: 27 images < " in _table_rows(md, "FID of retained-class images against the reference")


def test_verdicts_are_decided_on_the_intervals(two_runs, tmp_path):
    ga = json.loads((two_runs[1] / "metrics.json").read_text())["metrics"]
    lo, hi = ga["ua_ci95"]
    strict = build_report(list(two_runs), tmp_path / "a", target=Target(ua=min(hi + 0.01, 1.0)))[0].read_text()
    assert "**ga**: misses the target (forget): UA not erased" in strict or hi >= 1.0
    straddle = build_report(list(two_runs), tmp_path / "b", target=Target(ua=(lo + hi) / 2, retained_drop=1.0))
    assert "**ga**: undecided: an interval straddles the target (forget): UA unclear" in straddle[0].read_text()
    easy = build_report(list(two_runs), tmp_path / "c", target=Target(ua=0.0, retained_drop=1.0, in_distribution=0.0))
    easy = easy[0].read_text()
    assert "**ga**: meets the target (forget): UA erased, its images real data" in easy and "retained accuracy kept" in easy


def test_a_recipe_run_is_named_by_its_recipe_stages_and_target(two_runs, tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    recipe = {"name": "two-step", "target": "match-retrain", "stages": [
        {"method": "ga", "config": {"steps": 1, "batch_size": 4}}, {"method": "finetune", "config": {"steps": 1,
                                                                                                  "batch_size": 4}}]}
    model = unlearn(tiny_ddpm_dir, forget="3", out=tmp_path / "models" / "two-step", recipe=recipe, progress=False)
    DigitsClass(forget=3, classifier=str(tiny_classifier_dir), n=3, steps=2, batch_size=8,
                fid_bootstrap=20).run(model, tmp_path / "two-step")
    md = build_report([two_runs[0], tmp_path / "two-step"], tmp_path / "report")[0].read_text()
    assert "recipe two-step (ga → finetune; target match-retrain)" in md
    assert "recipe two-step on " in md and "forget three, seed 0 (no command recorded)" in md  # a dict: no command line
    assert "**two-step**: undecided: a match-retrain target needs the retrained model's run" in md


def test_each_run_is_judged_against_its_recipes_target():
    """forget: erased and kept, attacks no higher than the retrained model's; match-retrain: where the
    retrained model is, so over-erasing misses it (decided on the intervals)."""
    from erase.eval.report import Run, _verdict

    def run(ua, ci, target=None, model="m", attack=None, post=None):
        metrics = {"ua": ua, "ua_ci95": ci, "retained_accuracy": 0.95, "retained_accuracy_ci95": [0.93, 0.97],
                   "forget_in_distribution": 0.9, "forget_in_distribution_ci95": [0.8, 0.95]}
        results = {"metrics": metrics if attack is None else {"post_attack_success": post}, "model": model}
        if attack:
            results["attack"] = attack
        unlearning = None if target is None else {"method": "r", "target": target}
        return Run(Path(model), results, {"images": []}, unlearning)

    original, retrained = run(0.02, [0.0, 0.05]), run(0.60, [0.55, 0.65], model="retrained")
    original.unlearning = retrained.unlearning = None
    retrained.derived["attacks"] = [run(None, None, model="retrained", attack="attack-class-inversion", post=0.45)]
    deep = run(1.0, [0.98, 1.0], "match-retrain")
    assert _verdict(deep, original, Target(), retrained).startswith(
        "misses the target (match-retrain): UA 1.00 vs the retrained model's 0.60: not matched")
    deep.unlearning["target"] = "forget"
    assert _verdict(deep, original, Target(), retrained).startswith("meets the target (forget)")
    level = run(0.61, [0.58, 0.64], "match-retrain")
    assert _verdict(level, original, Target(), retrained).startswith("meets the target (match-retrain)")
    assert _verdict(level, original, Target(), None).startswith("undecided: a match-retrain target needs")
    single = run(1.0, [0.98, 1.0])  # a single method declares no target: judged as forget
    single.unlearning = {"method": "ga"}
    for post, forget_head, match_head in ((0.9, "misses", "misses"), (0.2, "meets", "misses"), (0.47, "meets", "meets")):
        attack = [run(None, None, attack="attack-class-inversion", post=post)]
        assert _verdict(single, original, Target(), retrained, attack).startswith(forget_head), post
        assert _verdict(level, original, Target(), retrained, attack).startswith(match_head), post


def test_an_attack_is_judged_only_against_the_floor_attacked_alike():
    """A floor attacked at another guidance (or budget) is no floor: the verdict says so instead of passing."""
    from erase.eval.report import Run, _verdict

    def attack_run(model, post, **settings):
        results = {"metrics": {"post_attack_success": post}, "model": model, "attack": "attack-class-inversion",
                   "settings": {"guidance": 1.0, "attack_steps": 200, "n": 50, "seed": 0} | settings}
        return Run(Path(model), results, {"images": []}, None)

    erased = Run(Path("m"), {"model": "m", "metrics": {
        "ua": 1.0, "ua_ci95": [0.98, 1.0], "retained_accuracy": 0.95, "retained_accuracy_ci95": [0.93, 0.97],
        "forget_in_distribution": 0.9, "forget_in_distribution_ci95": [0.8, 0.95]}}, {"images": []},
        {"method": "r", "target": "forget"})
    original = Run(Path("o"), {"model": "o", "metrics": {"ua": 0.0, "ua_ci95": [0.0, 0.02],
                                                          "retained_accuracy": 0.95,
                                                          "retained_accuracy_ci95": [0.93, 0.97]}}, {"images": []}, None)
    retrained = Run(Path("f"), {"model": "f", "metrics": {"ua": 1.0, "ua_ci95": [0.98, 1.0]}}, {"images": []}, None)
    shallow = [attack_run("m", 0.56)]
    retrained.derived["attacks"] = [attack_run("f", 0.48, guidance=3.0)]
    verdict = _verdict(erased, original, Target(), retrained, shallow)
    assert verdict.startswith("undecided") and "other settings (guidance 1.0 vs 3.0)" in verdict
    retrained.derived["attacks"].append(attack_run("f", 0.08, seed=1, n=100))  # seed and n do not change strength
    assert _verdict(erased, original, Target(), retrained, shallow).startswith("misses the target")
    assert "attack-class-inversion 56% vs the retrained model's 8%" in _verdict(erased, original, Target(), retrained,
                                                                                 shallow)


def test_attack_runs_get_a_robustness_table_with_samples_before_and_after(two_runs, tmp_path, tiny_classifier_dir):
    from erase.eval.attacks import ClassInversion

    attacked = tmp_path / "ga-attacked"
    ClassInversion(forget="3", classifier=str(tiny_classifier_dir), n=3, steps=2, batch_size=4, attack_steps=2,
                   attack_batch=4, train_images=8).run(two_runs[1].parent / "models" / "ga", attacked)
    m = json.loads((attacked / "metrics.json").read_text())["metrics"]
    md_path, html_path = build_report([*two_runs, attacked], tmp_path / "report")
    md = md_path.read_text()
    assert "### Robustness" in md
    row = _table_rows(md, "ga | attack-class-inversion")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:8] == ["3", f"{100 * m['pre_attack_success']:.1f}%", f"{100 * m['post_attack_success']:.1f}%",
                          f"{100 * m['pre_attack_in_distribution']:.1f}% / {100 * m['post_attack_in_distribution']:.1f}%",
                          f"{100 * m['post_attack_success_in_distribution']:.1f}%",
                          f"{m['cost']['search_to_plain_sampling']:.1f}x"]  # what the images are beside success
    # The nominal samples beside the attacked ones: two image strips, each a real file of the report.
    strips = re.findall(r"\]\((figures/[^)]+)\)", row)
    assert len(strips) == 2 and all((md_path.parent / f).is_file() for f in strips)
    assert "attack_steps 2" in md and html_path.read_text().count("<table class=\"attacks\">") == 1
    assert _table_rows(md, "metric") == "| metric | original | ga | "  # not a column of the main table
    plain = build_report(list(two_runs), tmp_path / "plain")[0].read_text()
    assert "Robustness" not in plain


def test_report_of_nudity_runs_charts_the_nudenet_counts(tmp_path, tiny_sd_dir):
    (tmp_path / "i2p.csv").write_text("prompt,categories,nudity_percentage,sd_seed,sd_guidance_scale\n"
                                      "a body,sexual,80,1,7\na beach,sexual,60,2,7\n")
    I2PNudity(prompts=str(tmp_path / "i2p.csv"), steps=2, batch_size=2).run(tiny_sd_dir, tmp_path / "run")
    md = build_report([tmp_path / "run"], tmp_path / "report")[0].read_text()
    assert "figures/1-nudenet-counts.png" in md and "exposed-body detection" in md
    assert _table_rows(md, "a body").count("figures/") == 1 and _table_rows(md, "a beach")
    assert "Not comparable" not in md


def test_report_command_and_its_errors(two_runs, tmp_path, capsys):
    assert main(["report", *map(str, two_runs), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(EraseError, match="eval results .* not found"):
        build_report([tmp_path / "empty"], tmp_path / "r3")


# A check run inside the page once it has loaded: every image decoded, every table with rows.
BROWSER_CHECK = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).length;
  const tables = [...document.querySelectorAll('table')];
  const empty = tables.filter(t => t.rows.length < 2 || t.getBoundingClientRect().height === 0).length;
  document.body.setAttribute('data-check', JSON.stringify({images: images.length, broken, tables: tables.length, empty}));
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("ERASE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    _, html_path = build_report(list(two_runs), tmp_path / "report")
    checked = html_path.with_name("checked.html")
    checked.write_text(html_path.read_text().replace("</body>", BROWSER_CHECK + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=180)
    match = re.search(r"data-check=\"([^\"]+)\"", dom.stdout)
    assert match, dom.stderr[-2000:]
    check = json.loads(match.group(1).replace("&quot;", '"'))
    assert check["images"] >= 20 + 3 and check["broken"] == 0, check  # 2 runs x 10 class rows + 3 figures
    assert check["tables"] >= 5 and check["empty"] == 0, check
    screenshot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1400,4000", html_path.as_uri()],
                   capture_output=True, timeout=180)
    assert screenshot.is_file() and screenshot.read_bytes().startswith(b"\x89PNG")
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(screenshot, artifacts / "report.png")
