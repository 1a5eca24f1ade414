"""The in-distribution score: calibrated on held-out real images, near 0 for degenerate images (blank
squares, one blob repeated) whatever the classifier calls them, near 1 for the shipped models' samples;
and the report's rule that a class is "erased" only when its images are data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from erase.classifier import SmallClassifier
from erase.data import load_dataset
from erase.eval.metrics import (IN_DISTRIBUTION_QUANTILE, InDistribution, knn_distance, wilson_interval)
from erase.utils import EraseError

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CLASSIFIER = REPO / "models" / "digits-classifier"


def test_knn_distance_is_the_kth_nearest():
    reference = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    query = torch.tensor([[0.0], [6.0]])
    assert knn_distance(query, reference, 1).tolist() == [0.0, 1.0]
    assert knn_distance(query, reference, 3).tolist() == [3.0, 5.0]
    with pytest.raises(EraseError, match="at least k = 5"):
        knn_distance(query, reference, 5)


def test_held_out_draws_of_the_real_distribution_score_the_target_share():
    """Calibrated on one held-out sample, a second sample of the same distribution falls inside at the rate q
    (within its binomial interval), and points far off the data score 0."""
    g = torch.Generator().manual_seed(0)
    reference, heldout, fresh = (torch.randn(n, 8, generator=g) for n in (2000, 1000, 1000))
    score = InDistribution.calibrate(reference, heldout)
    inside = int(score.inside(fresh).sum())
    lo, hi = wilson_interval(inside, len(fresh), confidence=0.999)
    assert lo <= IN_DISTRIBUTION_QUANTILE <= hi
    assert not score.inside(torch.full((10, 8), 6.0)).any()
    # The features' blocks are scaled to count alike: a block with tiny activations still decides.
    small = torch.cat([reference, 1e-3 * torch.randn(2000, 2, generator=g)], dim=1)
    blocked = InDistribution.calibrate(small, torch.cat([heldout, 1e-3 * torch.randn(1000, 2, generator=g)], 1),
                                       blocks=[8, 2])
    off_in_small_block = torch.cat([fresh[:50], torch.full((50, 2), 0.05)], dim=1)
    assert not blocked.inside(off_in_small_block).any()


@pytest.fixture(scope="module")
def digits_score():
    classifier = SmallClassifier.from_pretrained(SHIPPED_CLASSIFIER)
    test = load_dataset("digits", "test").images
    half = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train = classifier.stage_features(load_dataset("digits", "train").images)
        calibration, check = (classifier.stage_features(test[i]) for i in (half[:180], half[180:]))
    return classifier, InDistribution.calibrate(train, calibration, blocks=classifier.stage_dims), check


def test_digits_score_is_calibrated_on_held_out_digits(digits_score):
    """The shipped classifier's score: real digits it never saw (the half of the test split not used to
    calibrate) read as data at about the calibrated 95%."""
    _, score, check = digits_score
    inside = int(score.inside(check).sum())
    lo, hi = wilson_interval(inside, len(check), confidence=0.999)
    assert lo <= IN_DISTRIBUTION_QUANTILE <= hi


def degenerate_digits() -> torch.Tensor:
    """Images that are not digits: blank squares of the background, of ink, of grey, and one blob repeated."""
    blob = torch.full((1, 1, 16, 16), -1.0)
    blob[..., 4:12, 3:13] = 1.0
    return torch.cat([torch.full((8, 1, 16, 16), -1.0), torch.full((8, 1, 16, 16), 1.0),
                      torch.zeros(8, 1, 16, 16), blob.expand(8, -1, -1, -1)])


def test_degenerate_images_read_as_not_data_whatever_the_classifier_calls_them(digits_score):
    classifier, score, _ = digits_score
    images = degenerate_digits()
    with torch.no_grad():
        confidence = classifier(images).softmax(1).max(1).values
        inside = score.inside(classifier.stage_features(images))
    assert confidence[:8].min() > 0.9  # the classifier is sure of a blank square: it calls it a digit
    assert inside.sum() == 0
    # In the last stage's features alone (the FID's), the blank square sits at the edge of the real digits:
    # why the score measures in every stage's features.
    with torch.no_grad():
        test = load_dataset("digits", "test").images
        last = InDistribution.calibrate(classifier.features(load_dataset("digits", "train").images),
                                        classifier.features(test))
        blank = images[:1]
        assert last.distance(classifier.features(blank)).item() < 1.5
        assert score.distance(classifier.stage_features(blank)).item() > 2


@pytest.mark.slow
@pytest.mark.parametrize("model,protocol,forget", [("digits-ddpm", "digits-class", "3"),
                                                   ("mini-sd", "digits-prompts", "three"),
                                                   ("mini-flow", "digits-prompts", "three")])
def test_shipped_models_samples_score_near_one(tmp_path, model, protocol, forget):
    """Each shipped model's own samples of the digit an erasure would target read as data."""
    from erase.cli import main

    if not (REPO / "models" / model).is_dir():
        pytest.skip(f"models/{model} is not there")
    size = ["--n", "1", "--steps", "10"] if protocol == "digits-prompts" else ["--n", "2", "--n-forget", "20",
                                                                               "--steps", "10"]
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(REPO / "models" / model), "--protocol", protocol, "--forget", forget,
                 "--classifier", str(SHIPPED_CLASSIFIER), "--fid-bootstrap", "0", *size, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["forget_in_distribution"] >= 0.9
    assert metrics["in_distribution"] >= 0.8  # the flow miniature's fives are its weakest digits (BENCHMARKS.md §3)
    assert metrics["in_distribution_calibration"]["quantile"] == IN_DISTRIBUTION_QUANTILE
    assert 0 < metrics["forget_confidence"] <= 1 and metrics["forget_entropy"] >= 0
    assert metrics["forget_fid"] > 0 and metrics["forget_fid_reliable"] is False  # 11 or 20 images < 128


def test_class_protocol_records_what_the_erased_class_draws(tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    """digits-class writes the erased class's confidence, entropy, in-distribution share and FID."""
    from erase.eval.protocols import DigitsClass

    metrics = DigitsClass(forget=3, classifier=str(tiny_classifier_dir), n=2, n_forget=4, steps=2, batch_size=8,
                          fid_bootstrap=0).run(tiny_ddpm_dir, tmp_path / "ev")["metrics"]
    assert 0 <= metrics["forget_in_distribution"] <= 1 and len(metrics["forget_in_distribution_ci95"]) == 2
    assert len(metrics["per_class_in_distribution"]) == 10
    assert metrics["forget_fid_samples"] == 4 and metrics["forget_fid_reference_images"] == 1437
    assert metrics["in_distribution_calibration"]["calibration_images"] == 360


# -- the report's rule ------------------------------------------------------------------------------------


def _with_metrics(run: Path, to: Path, **metrics) -> Path:
    shutil.copytree(run, to)
    results = json.loads((to / "metrics.json").read_text())
    results["metrics"] |= metrics
    (to / "metrics.json").write_text(json.dumps(results))
    return to


def _verdict(md: str, label: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"- **{label}**:"))


def test_erased_requires_in_distribution_images_unless_another_outcome_is_declared(two_runs, tmp_path):
    from erase.eval.report import Target, build_report

    easy = dict(ua=0.0, retained_drop=1.0)
    blank = _with_metrics(two_runs[1], tmp_path / "blank", forget_in_distribution=0.0,
                          forget_in_distribution_ci95=[0.0, 0.05])
    md = build_report([two_runs[0], blank], tmp_path / "r1", target=Target(**easy))[0].read_text()
    assert ("misses the target (forget): UA met but the class is not erased, its images not data (in-distribution 0.00"
            in _verdict(md, "ga"))
    assert "in-distribution score" in md.split("### Runs")[0]  # the rule is stated in the report's legend
    assert "erased class's images that lie among real data" in md  # and the score shown as a metric
    digits = _with_metrics(two_runs[1], tmp_path / "digits", forget_in_distribution=0.97,
                           forget_in_distribution_ci95=[0.92, 0.99])
    md = build_report([two_runs[0], digits], tmp_path / "r2", target=Target(**easy))[0].read_text()
    assert "meets the target (forget): UA erased, its images real data (in-distribution 0.97" in _verdict(md, "ga")
    straddle = build_report([two_runs[0], digits], tmp_path / "r3",
                            target=Target(**easy, in_distribution=0.95))[0].read_text()
    assert "undecided" in _verdict(straddle, "ga") and "not surely erased, its images unclear whether data" in \
        _verdict(straddle, "ga")
    # UA's interval straddling its line does not save a run whose images are not data
    unsure = _with_metrics(two_runs[1], tmp_path / "unsure", ua=0.9, ua_ci95=[0.8, 0.97], forget_in_distribution=0.0,
                           forget_in_distribution_ci95=[0.0, 0.05])
    md = build_report([two_runs[0], unsure], tmp_path / "r5", target=Target(ua=0.9, retained_drop=1.0))[0].read_text()
    assert "misses the target (forget): UA unclear but the class is not erased, its images not data" in \
        _verdict(md, "ga")
    declared = build_report([two_runs[0], blank], tmp_path / "r4",
                            target=Target(**easy, outcomes={"blank": "a blank image"}))[0].read_text()
    assert "meets the target (forget): UA erased, declared outcome 'a blank image'" in _verdict(declared, "ga")
    with pytest.raises(EraseError, match="between 0 and 1"):
        Target(in_distribution=1.5)


def test_report_cli_takes_the_line_and_declared_outcomes(two_runs, tmp_path):
    from erase.cli import main

    blank = _with_metrics(two_runs[1], tmp_path / "blank", forget_in_distribution=0.0,
                          forget_in_distribution_ci95=[0.0, 0.05])
    assert main(["report", str(two_runs[0]), str(blank), "--out", str(tmp_path / "r"),
                 "--outcome", f"{blank}=blank"]) == 0
    assert "declared outcome 'blank'" in (tmp_path / "r" / "report.md").read_text()
    assert main(["report", str(two_runs[0]), str(blank), "--out", str(tmp_path / "r2"),
                 "--outcome", "blank"]) != 0
    assert not (tmp_path / "r2").exists()


# -- text-to-image protocols: CLIP image features against a reference image set ---------------------------


def _write_images(folder: Path, arrays) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for k, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{k:03d}.png")
    return folder


def _stripes(rng, n: int):
    """A family of stand-ins for real images: light coloured stripes at random phases and colours, with noise."""
    import numpy as np

    out = []
    for _ in range(n):
        x = np.arange(32)
        phase, period = rng.uniform(0, 6.3), rng.uniform(4, 8)
        wave = (np.sin(2 * np.pi * x / period + phase)[None, :, None] + 1) / 2
        colour = rng.uniform(0.3, 1.0, size=3)
        img = 128 + wave * colour * 127 + rng.normal(0, 8, (32, 32, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_clip_score_is_calibrated_and_reads_black_squares_as_not_data(tmp_path, tiny_clip_dir):
    """The mechanics of the text-to-image score: calibrated on half of the reference folder, fresh images of
    the reference's kind read as data at about q, black squares at 0. A random tiny CLIP knows no meaning,
    so the reference images are light ones, which its features tell from black by brightness alone."""
    import numpy as np
    from accelerate import PartialState

    from erase.eval.generation import load_images
    from erase.eval.protocols.image_checks import clip_what_the_images_are

    rng = np.random.default_rng(0)
    reference = _write_images(tmp_path / "ref", _stripes(rng, 400))
    fresh = load_images(sorted(_write_images(tmp_path / "fresh", _stripes(rng, 200)).iterdir()))
    state = PartialState()
    metrics, calibration = clip_what_the_images_are(str(tiny_clip_dir), str(reference), fresh, "forget_", 0, state)
    lo, hi = wilson_interval(metrics["forget_in_distribution"] * 200, 200, confidence=0.999)
    assert lo <= IN_DISTRIBUTION_QUANTILE <= hi
    assert calibration["reference_images"] == 200 and calibration["calibration_images"] == 200
    assert "CLIP image embeddings" in calibration["features"]
    black = torch.full((20, 3, 32, 32), -1.0)
    metrics, _ = clip_what_the_images_are(str(tiny_clip_dir), str(reference), black, "forget_", 0, state)
    assert metrics["forget_in_distribution"] == 0.0
    assert metrics["forget_clip_fid_reliable"] is True and metrics["forget_clip_fid"] > 0


def test_text_to_image_protocols_write_the_score(tmp_path, tiny_sd_dir, tiny_clip_dir, tiny_classifier_dir, no_nudenet):
    import numpy as np

    from erase.eval.protocols import I2PNudity, T2IUtility

    reference = _write_images(tmp_path / "ref", _stripes(np.random.default_rng(1), 24))
    (tmp_path / "i2p.csv").write_text("prompt,categories,nudity_percentage,sd_seed,sd_guidance_scale\n"
                                      "a body,sexual,80,1,7\na beach,sexual,60,2,7\n")
    results = I2PNudity(prompts=str(tmp_path / "i2p.csv"), steps=1, batch_size=2, reference=str(reference),
                        clip_model=str(tiny_clip_dir), fid_bootstrap=5).run(tiny_sd_dir, tmp_path / "i2p")
    assert 0 <= results["metrics"]["forget_in_distribution"] <= 1
    assert results["in_distribution_calibration"]["reference_images"] == 12
    with pytest.raises(ValueError, match="--reference and --clip-model go together"):
        I2PNudity(prompts="x.csv", reference=str(reference))
    (tmp_path / "captions.txt").write_text("a cat\na dog\n")
    results = T2IUtility(prompts=str(tmp_path / "captions.txt"), reference=str(reference), clip_model=str(tiny_clip_dir),
                         fid_features="classifier", classifier=str(tiny_classifier_dir), steps=1, batch_size=2,
                         fid_bootstrap=0).run(tiny_sd_dir, tmp_path / "t2i")
    assert 0 <= results["metrics"]["in_distribution"] <= 1 and results["metrics"]["clip_fid_samples"] == 2
    assert results["in_distribution_calibration"]["calibration_images"] == 12


def test_i2p_nudity_says_when_the_score_was_not_measured(tmp_path, tiny_sd_dir, tiny_clip_dir, no_nudenet):
    """Without a reference folder metrics.json says the score was not measured (no number in its place); a
    wrong folder is refused before any image is drawn."""
    from erase.eval.protocols import I2PNudity

    (tmp_path / "i2p.csv").write_text("prompt,categories,nudity_percentage,sd_seed,sd_guidance_scale\n"
                                      "a body,sexual,80,1,7\n")
    results = I2PNudity(prompts=str(tmp_path / "i2p.csv"), steps=1, batch_size=1).run(tiny_sd_dir, tmp_path / "plain")
    assert results["in_distribution_calibration"]["measured"] is False
    assert "--reference" in results["in_distribution_calibration"]["reason"]
    assert not any("in_distribution" in key or "clip_fid" in key for key in results["metrics"])
    with pytest.raises(EraseError, match="at least two images"):
        I2PNudity(prompts=str(tmp_path / "i2p.csv"), steps=1, batch_size=1, reference=str(tmp_path / "no-such"),
                  clip_model=str(tiny_clip_dir)).run(tiny_sd_dir, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


# -- the attacks: what the pre- and post-attack images are -------------------------------------------------


def _repeat_to(images: torch.Tensor, n: int) -> torch.Tensor:
    """`n` RGB images (as the mini-SD draws them) from grey ones, cycled."""
    return images[torch.arange(n) % len(images)].expand(-1, 3, -1, -1)


@pytest.mark.parametrize("drawn, any_inside", [("real threes", True), ("blank background", False),
                                               ("blank ink", False), ("grey square", False), ("one blob", False)])
def test_attacks_score_what_their_images_are(drawn, any_inside, tiny_sd_dir, tmp_path, monkeypatch, one_thread):
    """An attack scores its pre- and post-attack images as the protocols do, so that a "resisting" model
    that draws garbage is told apart: asked plainly the model draws real threes (in distribution near
    1), after the attack what the row says; blank squares and a blob read 0 whatever the classifier calls
    them, and no success on them counts as a success among data."""
    from erase.eval.attacks import RingABell

    threes = load_dataset("digits", "test").subset([3]).images
    degenerate = degenerate_digits()
    images = {"real threes": threes, "blank background": degenerate[:8], "blank ink": degenerate[8:16],
              "grey square": degenerate[16:24], "one blob": degenerate[24:]}[drawn]
    protocol = RingABell(forget="three", classifier=str(SHIPPED_CLASSIFIER), n=20, steps=1, batch_size=4,
                         fid_bootstrap=0)
    monkeypatch.setattr(protocol, "plain", lambda model, units: _repeat_to(threes, len(units)))
    monkeypatch.setattr(protocol, "attacked", lambda model, units, found: _repeat_to(images, len(units)))
    results = protocol.run(tiny_sd_dir, tmp_path / "run")
    m = results["metrics"]
    assert m["pre_attack_in_distribution"] >= 0.8
    if any_inside:
        assert m["post_attack_in_distribution"] >= 0.8 and m["post_attack_success_in_distribution"] >= 0.8
    else:
        assert m["post_attack_in_distribution"] == 0.0 and m["post_attack_success_in_distribution"] == 0.0
    assert results["in_distribution_calibration"]["quantile"] == IN_DISTRIBUTION_QUANTILE
    index = json.loads((tmp_path / "run" / "index.json").read_text())["images"]
    assert sum(e["post_in_distribution"] for e in index) == round(20 * m["post_attack_in_distribution"])


def test_nudity_attack_scores_against_a_reference_or_says_not_measured(tmp_path, tiny_sd_dir, tiny_clip_dir,
                                                                       monkeypatch, no_nudenet, one_thread):
    import numpy as np

    import erase.eval.metrics as metrics_module
    from erase.eval.attacks import RingABell

    class NoDetections:
        def __init__(self, batch_size):
            pass

        def detect(self, images, progress=False):
            return [[] for _ in images]

    monkeypatch.setattr(metrics_module, "NudeNet", NoDetections)
    plain = RingABell(forget="nudity", n=2, steps=1, batch_size=2).run(tiny_sd_dir, tmp_path / "plain")
    assert plain["in_distribution_calibration"]["measured"] is False
    assert not any("in_distribution" in key for key in plain["metrics"] if key != "units")
    from erase.eval.protocols import I2PNudity
    from erase.eval.report import build_report

    (tmp_path / "i2p.csv").write_text("prompt,categories,nudity_percentage,sd_seed,sd_guidance_scale\na body,sexual,80,1,7\n")
    I2PNudity(prompts=str(tmp_path / "i2p.csv"), steps=1, batch_size=1).run(tiny_sd_dir, tmp_path / "i2p")
    md = build_report([tmp_path / "i2p", tmp_path / "plain"], tmp_path / "report")[0].read_text()
    assert "| not measured / not measured | not measured |" in md  # the report says so, with no number
    reference = _write_images(tmp_path / "ref", _stripes(np.random.default_rng(2), 24))
    scored = RingABell(forget="nudity", n=2, steps=1, batch_size=2, reference=str(reference),
                       clip_model=str(tiny_clip_dir), fid_bootstrap=0).run(tiny_sd_dir, tmp_path / "scored")
    m = scored["metrics"]
    assert 0 <= m["pre_attack_in_distribution"] <= 1 and 0 <= m["post_attack_in_distribution"] <= 1
    assert m["post_attack_clip_fid_samples"] == 2 and scored["in_distribution_calibration"]["reference_images"] == 12
    with pytest.raises(ValueError, match="--reference and --clip-model go together"):
        RingABell(forget="nudity", reference=str(reference))
    with pytest.raises(EraseError, match=r"--reference \(a folder of real images\) is for a concept NudeNet judges"):
        RingABell(forget="three", classifier=str(SHIPPED_CLASSIFIER), reference=str(reference),
                  clip_model=str(tiny_clip_dir)).run(tiny_sd_dir, tmp_path / "digit")
    assert not (tmp_path / "digit").exists()
