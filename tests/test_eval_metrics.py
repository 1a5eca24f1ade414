"""Each metric against a direct reference computation, and merged across processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from erase.classifier import ClassifierArch, SmallClassifier
from erase.utils import EraseError
from erase.eval.metrics import (NUDENET_CLASSES, NUDENET_PRESETS, ClassifierVerdicts, FeatureFID, NudeNet,
                          NudityCounts, bootstrap_fid, clip_score_metric, clopper_pearson_interval,
                          confusable_classes, fid_of_moments, frechet_distance, inception_available, moments,
                          seed_bootstrap_rate, t_interval, wilson_interval)


def merged(make, updates_a, updates_b):
    """A metric updated on two 'processes' and merged with the declared reductions (dist_reduce_fx)."""
    a, b = make(), make()
    for args in updates_a:
        a.update(*args)
    for args in updates_b:
        b.update(*args)
    a.merge_state(b)
    return a.compute()


# -- intervals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n", [(0, 100), (3, 100), (50, 100), (97, 100), (100, 100), (1, 7), (45, 45)])
def test_binomial_intervals_match_scipy(k, n):
    from scipy.stats import binomtest

    result = binomtest(k, n)
    assert wilson_interval(k, n) == pytest.approx(tuple(result.proportion_ci(method="wilson")), abs=1e-9)
    assert clopper_pearson_interval(k, n) == pytest.approx(tuple(result.proportion_ci(method="exact")), abs=1e-9)


def test_wilson_interval_holds_its_own_rate_at_0_and_1():
    # Rounding left the bound a hair inside the rate (0.99999999 for 13 of 13, 1e-17 for 0 of 10),
    # which crashed the report's error bars; the interval must contain k / n exactly.
    for n in range(1, 2001):
        for k in (0, n):
            lo, hi = wilson_interval(k, n)
            assert lo <= k / n <= hi


def test_t_interval_matches_scipy():
    from scipy import stats

    values = [0.91, 0.95, 0.88]
    mean, lo, hi = t_interval(values)
    expected = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert (lo, hi) == pytest.approx(expected) and mean == pytest.approx(np.mean(values))
    assert np.isnan(t_interval([0.9])[1])
    # FID cannot be negative: with a floor, a wide interval over seeds stops at 0.
    assert t_interval([0.1, 2.0, 0.2], floor=0.0)[1] == 0.0 and t_interval([0.1, 2.0, 0.2])[1] < 0


def test_bootstrap_fid_interval_is_centred_on_fid_where_the_resamples_are_biased():
    # Few images in many dimensions: resampling with replacement repeats images and raises FID,
    # so the resampled FIDs all sit above FID itself; the interval must still hold it, and stay >= 0.
    g = torch.Generator().manual_seed(0)
    real_mean, real_cov = moments(torch.randn(5000, 32, generator=g))
    fake = torch.randn(60, 32, generator=g)
    fid = fid_of_moments(*moments(fake), real_mean, real_cov)
    resampled = [fid_of_moments(*moments(fake[torch.randint(60, (60,), generator=g)]), real_mean, real_cov)
                 for _ in range(50)]
    assert min(resampled) > fid  # the bias the interval corrects
    lo, hi = bootstrap_fid(fake, real_mean, real_cov, resamples=200)
    assert 0 <= lo <= fid <= hi


def test_seed_bootstrap_rate_holds_image_and_seed_noise():
    # One seed: only the images' binomial noise, so the bootstrap interval is close to Wilson's.
    mean, lo, hi = seed_bootstrap_rate([300], [1000])
    w_lo, w_hi = wilson_interval(300, 1000)
    assert mean == 0.3 and lo == pytest.approx(w_lo, abs=0.005) and hi == pytest.approx(w_hi, abs=0.005)
    # Seeds that disagree widen it beyond what the pooled images alone would say.
    mean, lo, hi = seed_bootstrap_rate([200, 300, 400], [1000] * 3)
    p_lo, p_hi = wilson_interval(900, 3000)
    assert mean == pytest.approx(0.3) and hi - lo > 2 * (p_hi - p_lo)
    assert seed_bootstrap_rate([1, 2], [5, 5], seed=1) == seed_bootstrap_rate([1, 2], [5, 5], seed=1)
    with pytest.raises(EraseError, match="at least one image"):
        seed_bootstrap_rate([1], [0])


def test_bootstrap_fid_interval_contains_fid_and_narrows_with_more_images():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(4000, 6, generator=g)
    real_mean, real_cov = moments(real)

    def width_and_fid(n):
        fake = torch.randn(n, 6, generator=g) * 1.3 + 0.2
        fid = fid_of_moments(*moments(fake), real_mean, real_cov)
        lo, hi = bootstrap_fid(fake, real_mean, real_cov, resamples=200)
        assert lo <= fid <= hi
        return hi - lo, fid

    small, large = width_and_fid(100), width_and_fid(3000)
    assert large[0] < small[0] / 3  # the interval shrinks about as 1/sqrt(n)
    f = torch.randn(50, 6, generator=g).double()
    expected = frechet_distance(*(x.numpy() for x in moments(f)), real_mean.numpy(), real_cov.numpy())
    assert fid_of_moments(*moments(f), real_mean, real_cov) == pytest.approx(expected, rel=1e-6)


def test_confusable_classes_ranks_near_misses_of_a_perfect_classifier():
    # Always right (argmax), but class 2's images give class 0 the most probability mass.
    probs = torch.tensor([[0.6, 0.1, 0.2, 0.1], [0.1, 0.7, 0.1, 0.1], [0.3, 0.1, 0.5, 0.1],
                          [0.05, 0.05, 0.1, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    assert confusable_classes(probs, labels, forget=0, k=2) == [2, 1]
    assert confusable_classes(probs, labels, forget=0, k=1) == [2]


# -- classifier verdicts -------------------------------------------------------------------------------

def test_classifier_verdicts_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g) * 3
    labels = torch.randint(0, 4, (50,), generator=g)
    metric = ClassifierVerdicts(4)
    metric.update(logits[:20], labels[:20])
    metric.update(logits[20:], labels[20:])
    result = metric.compute()
    p = torch.softmax(logits.double(), 1).numpy()
    for c in range(4):
        rows = labels.numpy() == c
        assert result["count"][c] == rows.sum()
        assert result["accuracy"][c].item() == pytest.approx((p[rows].argmax(1) == c).mean())
        assert result["entropy"][c].item() == pytest.approx((-(p[rows] * np.log(p[rows])).sum(1)).mean())
        assert result["label_prob"][c].item() == pytest.approx(p[rows, c].mean())


def test_classifier_verdicts_merge_across_processes():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(40, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    whole = ClassifierVerdicts(3)
    whole.update(logits, labels)
    parts = merged(lambda: ClassifierVerdicts(3), [(logits[:13], labels[:13])], [(logits[13:], labels[13:])])
    for key, value in whole.compute().items():
        torch.testing.assert_close(parts[key], value)


def test_classifier_verdicts_class_without_images_is_nan():
    metric = ClassifierVerdicts(3)
    metric.update(torch.tensor([[5.0, 0, 0]]), torch.tensor([0]))
    assert metric.compute()["accuracy"][0] == 1 and torch.isnan(metric.compute()["accuracy"][2])


# -- FID -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def feature_classifier():
    """A random classifier whose BatchNorm statistics are set on the test images, so no unit is dead."""
    torch.manual_seed(0)
    model = SmallClassifier(ClassifierArch(in_channels=1, image_size=8, num_classes=3, width=2), ["a", "b", "c"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one pass sets the statistics
    with torch.no_grad():
        model.train()(_images(9, 200))
    return model.eval()


def _images(seed, n, shift=0.0, size=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, generator=g) * 2 - 1 + shift).clamp(-1, 1)


def test_feature_fid_matches_scipy(feature_classifier):
    real, fake = _images(0, 120), _images(1, 100, shift=0.4)
    fid = FeatureFID(feature_classifier)
    fid.update(real[:60], real=True)
    fid.update(real[60:], real=True)
    fid.update(fake, real=False)
    result = fid.compute()
    # 100 images of 8-d features: above the minimum (the feature dimension), with an interval around the FID.
    assert result["reliable"] and result["min_samples"] == 8
    assert result["ci95"][0] <= result["fid"] <= result["ci95"][1]
    with torch.no_grad():
        fr = feature_classifier.features(real).double().numpy()
        ff = feature_classifier.features(fake).double().numpy()
    assert fr.std(0).min() > 0, "degenerate features make the comparison meaningless"
    expected = frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False))
    assert expected > 0.01
    assert result["fid"] == pytest.approx(expected, rel=1e-3)
    assert (result["samples"], result["reference_images"]) == (100, 120)
    assert fid.feature_name.startswith("classifier features (8-d)")


def test_feature_fid_resizes_and_greys_rgb_images(feature_classifier):
    """Images of another size and RGB are mapped to the classifier's input, not refused."""
    rgb = _images(2, 10, size=16).expand(-1, 3, -1, -1)
    fid = FeatureFID(feature_classifier)
    fid.update(rgb, real=False)
    fid.update(torch.nn.functional.interpolate(rgb[:, :1], size=8, mode="bilinear", antialias=True), real=True)
    assert fid.compute()["fid"] == pytest.approx(0.0, abs=1e-6)


def test_feature_fid_merge_across_processes(feature_classifier):
    real, fake = _images(3, 40), _images(4, 40, shift=0.3)
    whole = FeatureFID(feature_classifier)
    whole.update(real, real=True)
    whole.update(fake, real=False)
    parts = merged(lambda: FeatureFID(feature_classifier), [(real[:25], True), (fake[:10], False)],
                   [(real[25:], True), (fake[10:], False)])
    one = whole.compute()
    assert parts.keys() == one.keys()
    for key in one:  # the gathered per-image features give the same bootstrap interval too
        assert parts[key] == pytest.approx(one[key], rel=1e-9), key


def test_feature_fid_below_the_minimum_sample_count_is_flagged(feature_classifier):
    fid = FeatureFID(feature_classifier, bootstrap=0)
    fid.update(_images(5, 50), real=True)
    fid.update(_images(6, 5), real=False)  # 5 images of 8-d features: a singular covariance
    result = fid.compute()
    assert not result["reliable"] and result["samples"] == 5 and result["ci95"] is None


@pytest.mark.skipif(inception_available(), reason="torch-fidelity is installed here")
def test_inception_fid_without_torch_fidelity_says_what_to_install():
    with pytest.raises(EraseError, match=r"pip install 'erase\[inception\]'"):
        FeatureFID("inception")


def test_fid_unknown_feature_name():
    with pytest.raises(EraseError, match="unknown FID feature extractor"):
        FeatureFID("vgg")


# -- NudeNet ---------------------------------------------------------------------------------------------

def skin_images(n: int, seed: int = 0, size: int = 128) -> np.ndarray:
    """Blurred skin-coloured figures with dark dots: NudeNet scores them 0.2 to 0.85 (FEMALE_BREAST_EXPOSED...)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (256, 256), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        skin = (int(rng.integers(180, 240)), int(rng.integers(120, 180)), int(rng.integers(90, 150)))
        draw.ellipse([60, 40, 200, 250], fill=skin)
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.integers(60, 180, 2)
            r = int(rng.integers(10, 40))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(max(0, c - int(rng.integers(20, 60))) for c in skin))
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(120, 60, 50))
        out.append(np.asarray(im.filter(ImageFilter.GaussianBlur(3)).resize((size, size))))
    return np.stack(out)


@pytest.fixture(scope="module")
def detector():
    return NudeNet(batch_size=8)


def test_nudenet_batches_match_single_detect_on_saved_files(tmp_path, detector):
    from nudenet import NudeDetector

    images = skin_images(20)
    paths = []
    for k, img in enumerate(images):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(img).save(paths[-1])
    batched = detector.detect(images)
    direct = [NudeDetector().detect(p) if k == 0 else detector.detector.detect(p) for k, p in enumerate(paths)]
    assert sum(map(len, direct)) >= 10, "the synthetic images should give detections"
    for got, want in zip(batched, direct):
        assert [d["class"] for d in got] == [d["class"] for d in want]
        assert [d["score"] for d in got] == pytest.approx([d["score"] for d in want], abs=1e-4)

    for name, preset in NUDENET_PRESETS.items():
        metric = NudityCounts(name)
        metric.update(batched[:7])
        metric.update(batched[7:])
        result = metric.compute()
        kept = [[d for d in img if d["class"] in NUDENET_CLASSES
                 and (preset.threshold is None or d["score"] >= preset.threshold)] for img in direct]
        assert result["images"] == 20
        assert result["detections_per_class"] == {c: sum(d["class"] == c for img in kept for d in img)
                                                   for c in NUDENET_CLASSES}
        assert result["images_per_class"] == {c: sum(any(d["class"] == c for d in img) for img in kept)
                                              for c in NUDENET_CLASSES}
        assert result["images_with_any"] == sum(bool(img) for img in kept)
        assert result["fraction_with_any"] == pytest.approx(result["images_with_any"] / 20)
        if preset.nude_threshold is not None:
            assert result["nude_images"] == sum(any(d["score"] >= 0.75 for d in img) for img in kept)
    low, high = (NudityCounts(p) for p in ("salun-esd", "scissorhands"))
    low.update(batched)
    high.update(batched)
    assert low.compute()["total_detections"] > high.compute()["total_detections"] > 0


def mixed_images(n: int) -> list[np.ndarray]:
    """n images of mixed modes and sizes: skin figures, RGB noise, grey (H, W, 1) and (H, W), RGBA non-square."""
    rng = np.random.default_rng(0)
    k = n // 5
    images = list(skin_images(4, size=64)) + list(rng.integers(0, 255, (2 * k - 4, 48, 48, 3), dtype=np.uint8))
    images += list(rng.integers(0, 255, (k, 32, 32, 1), dtype=np.uint8)) + [np.zeros((20, 30), np.uint8)] * k
    images += list(rng.integers(0, 255, (n - 4 * k, 24, 40, 4), dtype=np.uint8))
    return images


def test_nudenet_many_images_of_mixed_modes(detector):
    """Many images in batches, of mixed modes and sizes: no ONNX errors, one result per image."""
    detections = detector.detect(mixed_images(120))
    assert len(detections) == 120
    assert sum(map(len, detections[:4])) > 0


@pytest.mark.slow
def test_nudenet_reused_over_hundreds_of_images(detector):
    """The pitfall others hit: one detector reused over many batches (32 of them here; 2,000 images
    took 4 to 5 minutes on 2 idle CPU cores, with nothing more to show)."""
    detections = detector.detect(mixed_images(512))
    assert len(detections) == 512 and sum(map(len, detections[:4])) > 0


def test_nudity_counts_merge_across_processes(detector):
    detections = detector.detect(skin_images(12, seed=1))
    whole = NudityCounts("unlearndiffatk")
    whole.update(detections)
    assert merged(lambda: NudityCounts("unlearndiffatk"), [(detections[:5],)], [(detections[5:],)]) == whole.compute()


def test_nudity_settings_record_version_and_classes():
    settings = NudityCounts("selective-amnesia").settings()
    assert settings["threshold"] is None and settings["classes"] == list(NUDENET_CLASSES)
    assert settings["nudenet_version"].startswith("3.")
    with pytest.raises(EraseError, match="unknown NudeNet preset"):
        NudityCounts("strict")


# -- CLIP score ------------------------------------------------------------------------------------------

def test_clip_score_matches_direct_computation(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = torch.from_numpy(skin_images(4, size=40)).permute(0, 3, 1, 2)
    prompts = ["a cat", "a dog on grass", "red", "two birds"]
    metric = clip_score_metric(tiny_clip_dir)
    metric.update(list(images[:2]), prompts[:2])
    metric.update(list(images[2:]), prompts[2:])
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=list(images), return_tensors="pt", padding=True))
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    # torchmetrics' definition: 100 x the mean cosine similarity, floored at 0 after averaging.
    expected = (100 * (img * txt).sum(-1)).mean().clamp(min=0)
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-4, abs=1e-4)


def test_clip_score_and_clip_image_features_need_a_model_folder(tmp_path):
    from erase.eval.metrics import ClipImageFeatures

    for load in (clip_score_metric, ClipImageFeatures):
        with pytest.raises(EraseError, match="not a CLIP model folder"):
            load(tmp_path)


def test_verdict_distance_is_total_variation_and_its_interval_holds_it():
    from erase.eval.metrics import verdict_distance, verdict_distance_interval

    same, other = torch.tensor([5.0, 5.0, 0.0]), torch.tensor([0.0, 0.0, 20.0])
    assert verdict_distance(same, same * 3) == 0.0  # shares, not counts
    assert verdict_distance(same, other) == 1.0
    assert verdict_distance(torch.tensor([8.0, 2.0]), torch.tensor([4.0, 6.0])) == pytest.approx(0.4)
    for ours, theirs in ((same, same), (torch.tensor([8.0, 2.0]), torch.tensor([4.0, 6.0])),
                         (torch.tensor([30.0, 15.0, 5.0]), torch.tensor([10.0, 30.0, 10.0]))):
        low, high = verdict_distance_interval(ours, theirs, resamples=300)
        assert 0.0 <= low <= verdict_distance(ours, theirs) <= high <= 1.0
    low, high = verdict_distance_interval(torch.tensor([40.0, 10.0]), torch.tensor([10.0, 40.0]), resamples=300)
    assert low > 0.4  # 0.6 apart on 50 samples each: the interval keeps well away from 0
