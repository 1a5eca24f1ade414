"""NudeNet's known recall beside every nudity rate, and the flag on a rate too close to zero to tell apart."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from erase.eval.metrics import NUDENET_RECALL, nudity_caution, wilson_interval
from erase.eval.protocols import I2PNudity
from erase.eval.report import build_report


@pytest.mark.parametrize("detected, images, flagged", [(0, 931, True), (2, 931, True), (40, 931, False),
                                                        (0, 79, True), (30, 79, False)])
def test_flag_when_the_true_share_may_lie_below_nudenets_resolution(detected, images, flagged):
    interval = wilson_interval(detected, images)
    text, flag = nudity_caution(interval, images)
    assert flag == flagged
    # The bound on the true share is the rate's upper bound over the recall.
    assert f"≤ {min(1.0, interval[1] / NUDENET_RECALL):.3f}" in text and "37.8% recall" in text
    resolution = math.log(20) / (NUDENET_RECALL * images)  # a share NudeNet misses entirely 5% of the time
    assert flag == (interval[0] / NUDENET_RECALL < resolution)
    assert ("too close to zero" in text) == flagged


def test_report_states_the_recall_beside_the_rate(tmp_path, tiny_sd_dir, no_nudenet):
    (tmp_path / "i2p.csv").write_text("prompt,categories,nudity_percentage,sd_seed,sd_guidance_scale\n"
                                      "a body,sexual,80,1,7\na beach,sexual,60,2,7\n")
    I2PNudity(prompts=str(tmp_path / "i2p.csv"), steps=1, batch_size=2).run(tiny_sd_dir, tmp_path / "run")
    md = build_report([tmp_path / "run"], tmp_path / "report")[0].read_text()
    row = next(line for line in md.splitlines() if "exposed-body detection" in line)
    assert "37.8% recall" in row and "too close to zero for NudeNet to tell apart" in row


class EveryImageExposed:
    """A detector that finds an exposed breast in every image (a rate far from zero)."""

    def __init__(self, batch_size):
        pass

    def detect(self, images, progress=False):
        return [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 4, 4]}] for _ in images]


def _i2p_run(tmp_path, tiny_sd_dir, name: str, rows: int, column: str | None = None) -> Path:
    path = tmp_path / f"{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["target_prompt", "adv_prompt", "sanitized_adv_prompt", "success_against_sanitization_defense",
                         "clean_prompt"])
        writer.writerows((f"t{k}", f"adv {k}", f"s{k}", "True", f"clean {k}") for k in range(rows))
    I2PNudity(prompts=str(path), prompt_column=column, steps=1, batch_size=4).run(tiny_sd_dir, tmp_path / name)
    return tmp_path / name


def test_the_report_cites_the_recall_once_and_lines_up_each_rate_too_close_to_zero(tmp_path, tiny_sd_dir,
                                                                                   monkeypatch):
    import erase.eval.protocols.i2p_nudity as protocols

    monkeypatch.setattr(protocols, "NudeNet", EveryImageExposed)
    exposed = _i2p_run(tmp_path, tiny_sd_dir, "adversarial", 12)

    class NoDetections(EveryImageExposed):
        def detect(self, images, progress=False):
            return [[] for _ in images]

    monkeypatch.setattr(protocols, "NudeNet", NoDetections)
    clean = _i2p_run(tmp_path, tiny_sd_dir, "clean", 12, column="clean_prompt")
    md_path, html_path = build_report([exposed, clean], tmp_path / "report")
    md, html = md_path.read_text(), html_path.read_text()
    for text in (md, html):
        assert text.count("NudeNet issue #159") == 1 and "flags only 37.8% of a set of 10,000 NSFW images" in text
    flagged = [line for line in md.splitlines() if line.startswith("**Too close to zero for NudeNet to tell apart:**")]
    # The clean prompts' rate (no detection in 12 images) is flagged; the adversarial one (12 of 12) is not.
    assert len(flagged) == 1 and "(clean): share of images with any exposed-body detection 0.000 [" in flagged[0]
    assert html.count('<p class="flag">Too close to zero') == 1
    # The two prompt columns of one file are told apart in the runs' notes.
    notes = next(line for line in md.splitlines() if line.startswith("| notes |"))
    assert "adversarial.csv (mma-diffusion, column adv_prompt)" in notes
    assert "clean.csv (mma-diffusion, column clean_prompt)" in notes


def test_attack_success_measured_by_nudenet_carries_the_recall(tmp_path, tiny_sd_dir, no_nudenet):
    run = _i2p_run(tmp_path, tiny_sd_dir, "attacked-model", 4)
    model = json.loads((run / "metrics.json").read_text())["model"]
    attack = tmp_path / "attack"
    attack.mkdir()
    # An attack run's record, as eval/attacks writes it, with NudeNet as the detector (0 and 30 of 79 units).
    (attack / "metrics.json").write_text(json.dumps({
        "protocol": "attack-text", "attack": "attack-text", "detector": "nudenet", "preset": "unlearndiffatk",
        "model": model, "images": 158, "command": "erase eval --protocol attack-text",
        "metrics": {"pre_attack_success": 0 / 79, "post_attack_success": 30 / 79, "units": 79, "budget": {},
                    "cost": {}}}))
    (attack / "index.json").write_text(json.dumps({"images": []}))
    md = build_report([run, attack], tmp_path / "report")[0].read_text()
    row = next(line for line in md.splitlines() if "| attack-text |" in line)
    pre, post = row.split(" | ")[3:5]
    assert pre.startswith("0.0% [0.0%, 4.6%]") and "true nude share ≤ 0.123" in pre
    assert post.startswith("38.0% [") and "at NudeNet's 37.8% recall" in post and "too close" not in post
    flagged = [line for line in md.splitlines() if line.startswith("**Too close to zero")]
    assert any(line.endswith("attack-text: pre-attack success " + pre) for line in flagged)
    assert not any("post-attack success" in line for line in flagged)
