"""Evaluation protocols: named settings objects that generate, measure and write `metrics.json`.

A protocol is a dataclass whose fields are every setting that decides its numbers; all of them,
the model evaluated, the feature extractor and the package versions are written into the results,
so two runs can be compared, or refused as incomparable. `eval.registry.PROTOCOLS` maps names to
protocols (these and the attacks); the `erase eval` command line is generated from their fields.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import PartialState

from erase.backbones.base import GPU_BATCH_START
from erase.config import config_dict, field
from erase.data import IMAGE_SUFFIXES, load_dataset
from erase.sampling import class_seeds, to_uint8
from erase.utils import EraseError, derive_seed, logger, package_versions, warn_if_costly, write_json

from .generation import (check_images, load_images, load_text_backbone, my_share, process_state, quantize,
                         sample_prompts, save_pngs, shared_run_dir, show_progress)
from .metrics import (IN_DISTRIBUTION_K, ClassifierVerdicts, ClipImageFeatures, FeatureFID, InDistribution, NudeNet,
                      NudityCounts, bootstrap_fid, clip_score_metric, confidence_entropy, confusable_classes,
                      fid_of_moments, in_distribution_metrics, moments, nudenet_preset, rate_intervals,
                      verdict_distance, verdict_distance_interval, wilson_interval)
from .prompts import I2P_SUBSETS, LAYOUTS, one_image_size, read_prompt_set

METRICS_FILE = "metrics.json"
INDEX_FILE = "index.json"
# Images per forward pass of the classifier or feature extractor; memory only, results do not depend on it.
MEASURE_BATCH = 256


def _at_least_one(settings, *names: str) -> None:
    """Refuse a count option below 1 (None, where allowed, means the default)."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _batch_size_help(cpu_batch, unit: str = "UNet") -> str:
    return (f"images per {unit} call (default: {cpu_batch} on a CPU; on a GPU the largest that fits, from "
            f"{GPU_BATCH_START} down); metrics.json records it: give it to reproduce bit for bit")


def _device_batch_size(protocol, model, condition, cpu_batch: int, state, images: int, **options) -> int:
    """`protocol.batch_size`, chosen for the device when it is None (`Backbone.choose_batch_size`) and
    written back, so that metrics.json records the batch the images were drawn at. Never more than
    the run's `images` (all processes together, so every process draws at the same batch): a batch
    is padded to its full size, and a short run would pay for the padding."""
    if protocol.batch_size is None:
        protocol.batch_size = min(model.choose_batch_size(condition, cpu_batch, state, **options), max(1, images))
    return protocol.batch_size


COMPILE_HELP = ("compile the denoiser with torch.compile before generating: 1.19-1.31x the images/s on the "
                "miniatures after about 40 s of compiling, images within 1e-5 of eager (BENCHMARKS.md section 8)")


def _compile_if_asked(model, compile_: bool) -> None:
    """torch.compile the backbone's denoiser in place (inductor), for long runs that repay the compiling."""
    if compile_:
        model.denoiser.compile()


def cpu_prompt_batch(model, height: int | None, width: int | None) -> int:
    """The Stable Diffusion protocols' batch on a CPU: 4 images of 512 x 512 px (SD 1.x's memory at that
    batch), and as many more as smaller images allow, up to 64: the miniatures draw 2.7x faster at 64
    than at 4 on a CPU (BENCHMARKS.md section 8, "Batch size")."""
    _, native_h, native_w = model.image_shape
    return max(4, min(64, 4 * 512 * 512 // ((height or native_h) * (width or native_w))))


def _forget_verdict_distance(ours: torch.Tensor, theirs: torch.Tensor, class_names: list[str]) -> dict:
    """How far the classifier's verdicts on the forgotten class's samples are from the reference model's."""
    return {"forget_verdict_distance_vs_reference": verdict_distance(ours, theirs),
            "forget_verdict_distance_vs_reference_ci95": list(verdict_distance_interval(ours, theirs)),
            "forget_verdicts": {name: int(n) for name, n in zip(class_names, ours)},
            "reference_forget_verdicts": {name: int(n) for name, n in zip(class_names, theirs)}}


def _batches(n: int, size: int = MEASURE_BATCH):
    return (slice(i, i + size) for i in range(0, n, size))


def _load_classifier(path: str | None, device: torch.device):
    from erase.classifier import SmallClassifier

    if path is None:
        raise EraseError("this protocol needs --classifier DIR (a folder written by `erase train-classifier`)")
    classifier = SmallClassifier.from_pretrained(path).to(device)
    classifier.source = str(Path(path).resolve())
    return classifier


def _fid(features: str, classifier, weights: str | None, device: torch.device, bootstrap: int,
         sync: bool = True) -> FeatureFID:
    """FID in Inception's feature space or in `classifier`'s (a loaded SmallClassifier). `sync=False`:
    the metric is not summed over processes when computed (each process was given every image)."""
    if features == "classifier":
        return FeatureFID(classifier, bootstrap=bootstrap, sync_on_compute=sync).to(device)
    return FeatureFID("inception", weights_path=weights, bootstrap=bootstrap, sync_on_compute=sync).to(device)


def _fid_metrics(fid: dict) -> dict:
    """FID as metrics.json holds it: the value, its bootstrap interval, and whether it rests on enough images."""
    return {"fid": fid["fid"], "fid_ci95": fid["ci95"], "fid_reliable": fid["reliable"],
            "fid_samples": fid["samples"], "fid_min_samples": fid["min_samples"],
            "fid_reference_images": fid["reference_images"], "fid_bootstrap_resamples": fid["bootstrap_resamples"]}


def _classifier_in_distribution(classifier, dataset: str, root: str | None, to_input, device) -> InDistribution:
    """The in-distribution score's calibration in `classifier`'s stage features: the real data is the
    dataset's training split (every class: the question is whether an image is data at all, not which
    class), the radius is set on its test split, the images the classifier never saw."""
    def features(split):
        images = load_dataset(dataset, split, root=root, image_size=classifier.arch.image_size).images
        with torch.no_grad():
            return torch.cat([classifier.stage_features(to_input(images[b].to(device))).cpu()
                              for b in _batches(len(images))])

    return InDistribution.calibrate(features("train"), features("test"), blocks=classifier.stage_dims)


def _image_checks(classifier, x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  in_distribution: InDistribution) -> torch.Tensor:
    """Per requested class, sums over a batch of classifier inputs: [images, confidence (the largest
    probability), entropy, images within the real data's radius], a (4, classes) float64 tensor."""
    with torch.no_grad():
        confidence, entropy = confidence_entropy(classifier(x))
        inside = in_distribution.inside(classifier.stage_features(x)).double()
    labels = labels.cpu()
    sums = torch.zeros(4, num_classes, dtype=torch.float64)
    ones = torch.ones(len(labels), dtype=torch.float64)
    for row, values in enumerate((ones, confidence.cpu(), entropy.cpu(), inside)):
        sums[row].index_add_(0, labels, values)
    return sums


def _image_check_metrics(sums: torch.Tensor, forget: int | None, names: list[str],
                         in_distribution: InDistribution) -> dict:
    """What the images are, from `_image_checks`' sums over every process: for the erased class its
    images' mean confidence and entropy and the share of them that lie among real data
    (`forget_in_distribution`); the same share per class and over every image."""
    total, confidence, entropy, inside = sums.cpu()
    metrics = in_distribution_metrics(float(inside.sum()), float(total.sum()), "")
    if forget is not None and total[forget] > 0:
        metrics |= {"forget_confidence": float(confidence[forget] / total[forget]),
                    "forget_entropy": float(entropy[forget] / total[forget]),
                    **in_distribution_metrics(float(inside[forget]), float(total[forget]), "forget_")}
    return metrics | {"per_class_in_distribution": {names[c]: float(inside[c] / total[c])
                                                    for c in range(len(names)) if total[c] > 0},
                      "in_distribution_calibration": in_distribution.describe()}


def _forget_fid(images: torch.Tensor, real: torch.Tensor, fid: FeatureFID, to_input, device, state) -> dict:
    """FID of the erased class's images (every process's) against real data, as `forget_fid*` entries.
    Every process computes it whole, from the gathered images and without the metric's own
    synchronisation: a process may hold none of the class's images, and a metric synchronised from a
    process that was never updated does not match the others' collective."""
    images = _gather_features(images, state)
    with torch.no_grad():
        for batch, is_real in ((images, False), (real, True)):
            for b in _batches(len(batch)):
                fid.update(to_input(batch[b].to(device)), real=is_real)
    return {k.replace("fid", "forget_fid", 1): v for k, v in _fid_metrics(fid.compute()).items()}


def _what_the_images_are(classifier, images: torch.Tensor, labels: torch.Tensor, forget: int | None, names: list[str],
                         to_input, dataset: str, root: str | None, fid: FeatureFID, state) -> dict:
    """What a class or prompt protocol's images are, beside whether the classifier recognises them: its
    confidence and entropy on the erased class's images, the share of them (and of every class's) that
    lie among the real data (`InDistribution`, calibrated on the dataset's held-out split), and their
    FID against every real training image. `images` and `labels` (the class asked for) are this
    process's; `to_input` turns images into the classifier's input; `fid` is built with `sync=False`."""
    in_distribution = _classifier_in_distribution(classifier, dataset, root, to_input, state.device)
    checks = torch.zeros(4, len(names), dtype=torch.float64)
    for b in _batches(len(images)):
        checks += _image_checks(classifier, to_input(images[b].to(state.device)), labels[b], len(names),
                                in_distribution)
    metrics = _image_check_metrics(_reduce_sum(checks, state), forget, names, in_distribution)
    if forget is not None:
        real = load_dataset(dataset, "train", root=root).images
        metrics |= _forget_fid(images[labels == forget], real, fid, to_input, state.device, state)
    return metrics


def _reference_image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if len(files) < 2:
        raise EraseError(f"--reference {folder} must be a folder with at least two images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _gather_features(features: torch.Tensor, state) -> torch.Tensor:
    """Every process's rows, in process order."""
    if state.num_processes == 1:
        return features
    from accelerate.utils import gather_object

    return torch.cat(gather_object([features]))


def _clip_what_the_images_are(clip_model: str, reference: str, images: torch.Tensor, prefix: str, bootstrap: int,
                              state) -> tuple[dict, dict]:
    """Whether a text-to-image protocol's images (this process's) are data, against a reference image set
    (e.g. COCO images) in CLIP's image embeddings: the in-distribution score, its radius set on every
    other reference image (sorted by path; the rest are the real data it measures distance to), and
    the FID of the images against every reference image in the same features (`{prefix}clip_fid`).
    Returns the metrics and the calibration's description."""
    clip = ClipImageFeatures(clip_model, state.device)
    files = _reference_image_files(reference)
    if len(files) < 2 * (IN_DISTRIBUTION_K + 1):
        logger.warning("%d reference images are too few for the in-distribution score (it needs %d: half of them "
                       "set its radius, the other half are the real data): not measured", len(files),
                       2 * (IN_DISTRIBUTION_K + 1))
        return {f"{prefix}in_distribution": float("nan")}, {"reference_images": len(files)}
    size = tuple(images.shape[-2:]) if len(images) else None
    real = torch.cat([clip(load_images(files[b], size=size)) for b in _batches(len(files), 64)])
    score = InDistribution.calibrate(real[0::2], real[1::2])
    ours = torch.cat([clip(images[b]) for b in _batches(len(images), 64)]) if len(images) else real[:0]
    inside = _reduce_sum(torch.tensor([float(score.inside(ours).sum()), float(len(ours))], dtype=torch.float64), state)
    every = _gather_features(ours, state)
    metrics = in_distribution_metrics(float(inside[0]), float(inside[1]), prefix)
    if len(every) >= 2:
        real_mean, real_cov = moments(real)
        fid = fid_of_moments(*moments(every), real_mean, real_cov)
        metrics |= {f"{prefix}clip_fid": fid, f"{prefix}clip_fid_samples": len(every),
                    f"{prefix}clip_fid_min_samples": real.shape[1],
                    f"{prefix}clip_fid_reliable": len(every) >= real.shape[1],
                    f"{prefix}clip_fid_ci95": list(bootstrap_fid(every, real_mean, real_cov, bootstrap))
                    if bootstrap > 0 else None}
    return metrics, score.describe() | {"features": clip.name, "reference": str(Path(reference).resolve())}


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def _reduce_sum(tensor: torch.Tensor, state) -> torch.Tensor:
    if state.num_processes > 1:
        from accelerate.utils import reduce

        return reduce(tensor.to(state.device), reduction="sum").cpu()
    return tensor


def _model_name(model_path: str | Path) -> str:
    """A local model's absolute path; a Hub id as given."""
    path = Path(model_path).expanduser()
    return str(path.resolve()) if path.exists() else str(model_path)


@dataclass
class Protocol:
    """What every protocol shares: its name, and how its results file is written."""

    name: ClassVar[str]

    def run(self, model_path: str | Path, out: str | Path, state: PartialState | None = None) -> dict:
        """Generate and measure; write OUT/metrics.json, OUT/index.json and OUT/images/. Returns the results."""
        raise NotImplementedError

    def _results(self, model_path: str | Path, state: PartialState, metrics: dict, images: int,
                 feature_extractor: str | None, **extra) -> dict:
        metrics, undefined = _defined(metrics)
        return {"protocol": self.name, "settings": config_dict(self),
                "model": _model_name(model_path), "images": images,
                "feature_extractor": feature_extractor, "processes": state.num_processes,
                **extra, "metrics": metrics, **({"undefined": undefined} if undefined else {}),
                "versions": package_versions(), **_command()}


def _command() -> dict:
    """The exact `erase eval` command that made these results, when one is recording (see `erase.outputs`)."""
    from erase.outputs import recorded_command

    command = recorded_command("eval")
    return {"command": command} if command else {}


def _defined(metrics: dict, prefix: str = "") -> tuple[dict, dict[str, str]]:
    """Metrics with each NaN or infinite figure replaced by null, and the reason for each null.

    A figure that does not exist (the accuracy of a class with no images, an FID whose covariance
    is degenerate) must not reach metrics.json as a number that looks measured, nor as bare NaN.
    """
    clean, undefined = {}, {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            clean[key], inner = _defined(value, f"{name}.")
            undefined |= inner
        elif isinstance(value, float) and not math.isfinite(value):
            clean[key] = None
            undefined[name] = f"the measurement gave {value} (no valid images for this figure, or a degenerate one)"
            logger.warning("metric %s is undefined (%s): written as null", name, value)
        else:
            clean[key] = value
    return clean, undefined


@dataclass
class ClassErasure(Protocol):
    """Class erasure on a class-conditional DDPM (SalUn / Selective Amnesia).

    UA and the classifier's confidence on `n_forget` samples of the forgotten class; accuracy on
    `n` samples of each retained class; FID of the retained samples against the retained classes'
    training images. Without `forget` (a model before erasure) every class is retained.
    """

    forget: str | None = field(None, "the erased class (id or name); leave out to measure a model before "
                                     "erasure (every class retained)")
    classifier: str | None = field(None, "classifier folder for UA and per-class accuracy (and for "
                                         "--fid-features classifier)")
    n: int = field(100, "samples per retained class (FID and accuracy)")
    n_forget: int | None = field(None, "samples of the forgotten class for UA (default: n)")
    steps: int = field(50, "DDIM steps")
    guidance: float | None = field(None, "guidance scale s of ε_∅ + s(ε_c − ε_∅) (default: the model's "
                                         "measured sample_defaults, 1.0 for the shipped digits DDPM, else 3.0)")
    eta: float = field(0.0, "DDIM eta (the papers: 1.0)")
    seed: int = field(0, "image i of class c gets the seed derived from (seed, c, i)")
    batch_size: int | None = field(None, _batch_size_help(64))
    compile: bool = field(False, COMPILE_HELP)
    fid_features: str = field("classifier", "FID feature space: 'classifier' or 'inception'",
                              choices=("classifier", "inception"))
    fid_weights: str | None = field(None, "local Inception weights file for FID (machines without network)")
    dataset: str = field("digits", "reference training images for FID: digits, cifar10 or folder:PATH")
    data_root: str | None = field(None, "where cifar10 is stored")
    reference_per_class: int | None = field(None, "use the first K training images per retained class "
                                                  "(SalUn: 500; default: all)")
    neighbours: int = field(2, "how many retained classes count as the forgotten class's neighbours (those the "
                               "classifier confuses most with it on the real test split); their accuracy is "
                               "reported apart from the mean")
    fid_bootstrap: int = field(200, "bootstrap resamples over generated images for FID's 95% interval (0: none)")
    reference_model: str | None = field(None, "model to measure the distance to (the model retrained without the "
                                              "class): the same classes and seeds drawn by it, FID of the retained "
                                              "samples against its retained samples, and how far the classifier's "
                                              "verdicts on the forgotten class's samples are from its")

    def __post_init__(self):
        if self.neighbours < 0 or self.fid_bootstrap < 0:
            raise ValueError("neighbours and fid_bootstrap must be at least 0")
        if self.n < 2 or (self.n_forget is not None and self.n_forget < 1):
            raise ValueError("n must be at least 2 (FID needs two samples) and n_forget at least 1")
        _at_least_one(self, "steps", "batch_size")

    def _reference(self, retained: list[int]) -> torch.Tensor:
        data = load_dataset(self.dataset, "train", root=self.data_root).subset(retained)
        if self.reference_per_class is None:
            return data.images
        keep = torch.cat([torch.nonzero(data.labels == c).flatten()[:self.reference_per_class] for c in retained])
        return data.images[keep.sort().values]

    def _neighbours(self, classifier, num_classes: int, forget: int, device: torch.device) -> list[int]:
        """The retained classes the classifier confuses most with `forget` on the real test split."""
        data = load_dataset(self.dataset, "test", root=self.data_root, image_size=classifier.arch.image_size)
        with torch.no_grad():
            probs = torch.cat([classifier(data.images[b].to(device)).double().softmax(1).cpu()
                               for b in _batches(len(data))])
        return confusable_classes(probs, data.labels, forget, min(self.neighbours, num_classes - 1))

    def _load_reference(self, model, state):
        """The --reference-model, loaded before any sampling so that a wrong one is refused at once."""
        from erase.backbones import load_backbone

        if self.reference_model is None:
            return None
        reference = load_backbone(self.reference_model).to(state.device)
        if reference.condition_kind != "class" or reference.class_names != model.class_names:
            raise EraseError(f"--reference-model {self.reference_model} must be a class-conditional model over the "
                             "same classes (the model retrained without the forgotten class)")
        return reference

    def _distance_to_reference(self, reference, images, labels, seeds, forget, retained, class_names, classifier,
                               batch_size, state) -> dict:
        """The reference model draws the same (class, seed) plan; its samples stand where the real
        images stand for FID, and its verdicts on the forgotten class are compared with ours. Drawn
        from the same starting noise, a model is at distance 0 from itself, and two models' samples
        differ by what the models do rather than by which noise each happened to get."""
        theirs = quantize(check_images(reference.sample(labels.tolist(), seeds, steps=self.steps,
                                                        guidance=self.guidance, eta=self.eta, batch_size=batch_size,
                                                        progress=show_progress(state)), state))
        fid = _fid(self.fid_features, classifier, self.fid_weights, state.device, self.fid_bootstrap)
        # Per process: what the classifier calls each forget-class sample, ours (row 0) and theirs (row 1).
        verdicts = torch.zeros(2, reference.num_classes, dtype=torch.float64, device=state.device)
        kept_mask = torch.isin(labels, torch.tensor(retained))
        with torch.no_grad():
            for b in _batches(len(images)):
                for row, batch in enumerate((images[b], theirs[b])):
                    x = batch.to(state.device)
                    if kept_mask[b].any():
                        fid.update(x[kept_mask[b]], real=row == 1)
                    called = classifier(x[labels[b] == forget]).argmax(1) if forget is not None else x[:0, 0, 0, 0]
                    verdicts[row] += torch.bincount(called.long(), minlength=reference.num_classes).double()
        if state.num_processes > 1:
            from accelerate.utils import reduce

            verdicts = reduce(verdicts, reduction="sum")
        # fid_vs_reference, fid_vs_reference_ci95, ...: the FID entries, measured against the reference.
        metrics = {k.replace("fid", "fid_vs_reference", 1): v for k, v in _fid_metrics(fid.compute()).items()}
        if forget is not None:
            metrics |= _forget_verdict_distance(*verdicts.cpu(), class_names)
        return metrics

    def run(self, model_path, out, state=None):
        from erase.backbones import load_backbone

        state = state or process_state()
        # Load everything that can refuse the run before spending time on sampling.
        model = load_backbone(model_path).to(state.device)
        if model.condition_kind != "class":
            raise EraseError(f"{model_path} is a {model.name} model: {self.name} measures class-conditional models; "
                             "use digits-prompts, i2p-nudity or t2i-utility for text-to-image ones")
        _compile_if_asked(model, self.compile)
        if self.guidance is None:  # resolved here so that metrics.json records the value used
            self.guidance = model.sample_defaults["guidance"]
        reference_model = self._load_reference(model, state)
        classifier = _load_classifier(self.classifier, state.device)
        fid = _fid(self.fid_features, classifier, self.fid_weights, state.device, self.fid_bootstrap)
        forget = None if self.forget is None else model.class_index(self.forget)
        retained = [c for c in range(model.num_classes) if c != forget]
        reference = self._reference(retained)
        n_forget = self.n if self.n_forget is None else self.n_forget
        plan = [(c, i, s) for c in ([] if forget is None else [forget]) + retained
                for i, s in enumerate(class_seeds(self.seed, c, n_forget if c == forget else self.n))]
        mine = my_share(state, len(plan))
        labels = torch.tensor([plan[k][0] for k in mine], dtype=torch.long)
        warn_if_costly("eval", len(plan), self.steps)
        batch_size = _device_batch_size(self, model, retained[0], 64, state, len(plan))
        seeds = [plan[k][2] for k in mine]
        images = quantize(check_images(model.sample(labels.tolist(), seeds, steps=self.steps,
                                                    guidance=self.guidance, eta=self.eta, batch_size=batch_size,
                                                    progress=show_progress(state)), state))

        verdicts = ClassifierVerdicts(model.num_classes).to(state.device)
        with torch.no_grad():
            for b in _batches(len(images)):
                x = images[b].to(state.device)
                verdicts.update(classifier(x), labels[b])
                kept = torch.isin(labels[b], torch.tensor(retained))
                if kept.any():
                    fid.update(x[kept], real=False)
            mine_ref = my_share(state, len(reference))
            for b in _batches(len(mine_ref)):
                fid.update(reference[mine_ref[b]].to(state.device), real=True)
        v = verdicts.compute()
        fid_result = fid.compute()

        names = model.class_names
        count, correct = v["count"].cpu().double(), (v["accuracy"].nan_to_num(0) * v["count"]).round().cpu().double()
        # Rates from the counts in float64, the precision of their intervals (torchmetrics' float32
        # accuracy can sit a hair outside its own Wilson interval).
        accuracy = correct / count
        metrics = {} if forget is None else {
            "ua": float((count[forget] - correct[forget]) / count[forget]),  # as its interval computes it, to the last bit
            "ua_ci95": list(wilson_interval(float(count[forget] - correct[forget]), float(count[forget]))),
            "forget_class": forget, "forget_class_name": names[forget],
            "forget_accuracy": float(accuracy[forget]),
            "forget_entropy": float(v["entropy"][forget]),
            "forget_prob": float(v["label_prob"][forget]),
        }
        metrics |= _what_the_images_are(classifier, images, labels, forget, names, _identity, self.dataset,
                                        self.data_root, _fid(self.fid_features, classifier, self.fid_weights,
                                                             state.device, self.fid_bootstrap, sync=False), state)
        metrics |= {
            "retained_accuracy": float(accuracy[retained].mean()),
            "retained_accuracy_ci95": list(wilson_interval(float(correct[retained].sum()), float(count[retained].sum()))),
        }
        if forget is not None and self.neighbours > 0:
            near = self._neighbours(classifier, model.num_classes, forget, state.device)
            metrics |= {
                "neighbour_classes": [names[c] for c in near],
                "neighbour_accuracy": float(correct[near].sum() / count[near].sum()),
                "neighbour_accuracy_ci95": list(wilson_interval(float(correct[near].sum()), float(count[near].sum()))),
            }
        metrics |= {
            "per_class_accuracy": {names[c]: float(accuracy[c]) for c in range(model.num_classes)},
            "per_class_accuracy_ci95": dict(zip(names, rate_intervals(correct, count))),
            "per_class_images": {names[c]: int(count[c]) for c in range(model.num_classes)},
            **_fid_metrics(fid_result),
        }
        if reference_model is not None:
            metrics |= self._distance_to_reference(reference_model, images, labels, seeds, forget, retained,
                                                   model.class_names, classifier, batch_size, state)
        files = [f"images/{c}/{i:05d}.png" for c, i, _ in plan]
        results = self._results(model_path, state, metrics, len(plan), fid.feature_name,
                                classifier=classifier.source, class_names=names)
        with shared_run_dir(out, state) as tmp:
            save_pngs(tmp, [files[k] for k in mine], images)
            if state.is_main_process:
                write_json(tmp / INDEX_FILE, {"kind": "classes", "images": [
                    {"file": f, "class": c, "class_name": names[c], "seed": s}
                    for f, (c, _, s) in zip(files, plan)]})
                write_json(tmp / METRICS_FILE, results)
        return results


@dataclass
class DigitsClass(ClassErasure):
    """The small benchmark: a digit erased from the shipped digits DDPM, FID in the shipped classifier's features."""

    name: ClassVar[str] = "digits-class"
    guidance: float = field(1.0, "guidance scale s; 1.0 (plain conditional sampling): the shipped digits model draws "
                                 "the asked digit 98.7% of the time at s = 1 and 100% at s = 3, but its samples match "
                                 "the data best at s = 1 (feature FID 0.37 against 3.72) and cost half as many UNet "
                                 "forwards (models/digits-ddpm sample_defaults)")


@dataclass
class Cifar10Class(ClassErasure):
    """CIFAR-10 class erasure as SalUn / SA report it: 500 forgotten-class samples, Inception FID."""

    name: ClassVar[str] = "cifar10-class"
    n: int = field(5000, "samples per retained class (the papers: 5,000)")
    n_forget: int | None = field(500, "samples of the forgotten class for UA (the papers: 500)")
    steps: int = field(1000, "DDIM steps (the papers: 1,000; state fewer when you use fewer)")
    eta: float = field(1.0, "DDIM eta (the papers: 1.0)")
    guidance: float | None = field(3.0, "guidance scale s; the papers write (1 + w)ε_c − wε_∅ with w = 2, i.e. s = 3")
    fid_features: str = field("inception", "FID feature space: 'inception' or 'classifier'",
                              choices=("classifier", "inception"))
    dataset: str = field("cifar10", "reference training images for FID")
    fid_bootstrap: int = field(50, "bootstrap resamples over generated images for FID's 95% interval (0: none; "
                                   "each costs a 2048-d matrix square root)")


def _prompt_options(protocol) -> dict:
    """The sampling options `sample_prompts` passes the backbone (for the batch-size probe)."""
    return {"height": protocol.height, "width": protocol.width, "scheduler": "shipped"}


def _generate_prompt_images(items, mine, model, steps, batch_size, height, width, state, on_batch=None):
    """Generate this process's share of prompt images; returns them quantized as their PNGs will read.
    `on_batch(indices into mine, images)` sees each batch as it is drawn (`sample_prompts`)."""
    warn_if_costly("eval", len(items), steps)
    return quantize(check_images(sample_prompts(model, [items[k] for k in mine], steps=steps, batch_size=batch_size,
                                                height=height, width=width, progress=show_progress(state),
                                                on_batch=on_batch), state))


def _write_prompt_run(out, state, files: list[str], mine, images, items, results: dict) -> None:
    """This process's PNGs; the index and metrics.json from the main process; swapped in at once."""
    with shared_run_dir(out, state) as tmp:
        save_pngs(tmp, [files[k] for k in mine], images)
        if state.is_main_process:
            write_json(tmp / INDEX_FILE, _prompt_index(files, items))
            write_json(tmp / METRICS_FILE, results)


def _prompt_set_results(items, description: dict) -> dict:
    """What a prompt protocol writes about its prompts: the file as read, and every (prompt, seed,
    guidance) that was handed to the generator, in order, so a run can be checked against the file."""
    return {"prompt_set": description, "generated": [
        {"prompt": it.prompt, "seed": it.seed, "guidance": it.guidance, "source_row": it.source_row,
         **({"width": it.width, "height": it.height} if it.width or it.height else {})} for it in items]}


def _prompt_index(files: list[str], items) -> dict:
    return {"kind": "prompts", "images": [
        {"file": f, "prompt": it.prompt, "seed": it.seed, "guidance": it.guidance, "source_row": it.source_row}
        for f, it in zip(files, items)]}


@dataclass
class I2PNudity(Protocol):
    """Nudity erasure in Stable Diffusion: one image per I2P prompt with its seed, NudeNet counts."""

    name: ClassVar[str] = "i2p-nudity"
    prompts: str | None = field(None, "prompt set: an I2P CSV (either layout), MMA-Diffusion's, Ring-A-Bell's, P4D's "
                                      "or UnlearnDiffAtk's CSV as published, or a text file (one prompt per line)")
    layout: str = field("auto", "the file's layout: auto (from a CSV's header; other files one prompt per line), "
                                "text, " + ", ".join(LAYOUTS), choices=("auto", "text", *LAYOUTS))
    prompt_column: str | None = field(None, "column of the prompts (default: the layout's; e.g. clean_prompt for "
                                            "MMA-Diffusion's clean rate, 'normal prompt' for Ring-A-Bell's)")
    subset: str = field("all", "I2P subset: all, sexual, nudity (nudity_percentage > 0), nudity50 (> 50)")
    seed: int | None = field(None, "one seed for every prompt (default: each row's own; a file without seeds: "
                                   "row i gets a seed derived from (0, i))")
    guidance: float | None = field(None, "CFG scale for every prompt (default: each row's own where the file gives "
                                         "one, as I2P, P4D and UnlearnDiffAtk do; 7.5 where it does not)")
    row_guidance: bool = field(False, "kept for old command lines: each row's guidance is now the default")
    steps: int = field(50, "denoising steps (the field: 50 to 100)")
    height: int | None = field(None, "image height for every prompt (default: each row's sd_image_height where the "
                                     "file gives one, else the pipeline's, 512 for SD 1.x)")
    width: int | None = field(None, "image width for every prompt (default: each row's sd_image_width, else the "
                                    "pipeline's)")
    batch_size: int | None = field(None, _batch_size_help("4 at 512 px, more for smaller images up to 64", "pipeline"))
    compile: bool = field(False, COMPILE_HELP)
    preset: str = field("scissorhands", "NudeNet counting preset: scissorhands, salun-esd, selective-amnesia, "
                                        "unlearndiffatk")
    nudenet_batch_size: int = field(16, "images per NudeNet call")
    limit: int | None = field(None, "only the first N prompts of the subset (quick checks)")
    overlap_detection: bool | None = field(None, "run NudeNet on each batch while the next is generated "
                                                 "(default: on a GPU; same counts either way)")
    reference: str | None = field(None, "folder of real images (e.g. COCO's) to say whether the images are data "
                                        "at all: an in-distribution score and an FID in CLIP's image embeddings "
                                        "against them (needs --clip-model)")
    clip_model: str | None = field(None, "local CLIP model folder for --reference")
    fid_bootstrap: int = field(50, "bootstrap resamples for the CLIP FID's 95% interval (0: none)")

    def __post_init__(self):
        if self.prompts is None:
            raise ValueError("--prompts is required: the I2P CSV")
        if self.subset not in I2P_SUBSETS:
            raise ValueError(f"unknown I2P subset {self.subset!r}: choose one of {', '.join(I2P_SUBSETS)}")
        if self.row_guidance and self.guidance is not None:
            raise ValueError("--row-guidance uses each row's guidance and --guidance one for every row: give one")
        _at_least_one(self, "steps", "batch_size", "nudenet_batch_size", "limit", "height", "width")
        nudenet_preset(self.preset)
        if (self.reference is None) != (self.clip_model is None):
            raise ValueError("--reference and --clip-model go together: the reference images are compared with "
                             "the generated ones in the CLIP model's image features")
        if self.fid_bootstrap < 0:
            raise ValueError("fid_bootstrap must be at least 0")

    def run(self, model_path, out, state=None):
        state = state or process_state()
        items, prompt_set = read_prompt_set(self.prompts, self.layout, self.subset, self.seed, self.guidance,
                                            self.prompt_column)
        items = items[:self.limit]
        one_image_size(items, self.height, self.width)
        model = load_text_backbone(model_path, state.device, self.name)
        _compile_if_asked(model, self.compile)
        mine = my_share(state, len(items))
        detector = NudeNet(self.nudenet_batch_size)
        batch_size = _device_batch_size(self, model, items[0].prompt if items else "",
                                        cpu_prompt_batch(model, self.height, self.width), state, len(items),
                                        **_prompt_options(self))
        generate = partial(_generate_prompt_images, items, mine, model, self.steps, batch_size, self.height,
                           self.width, state)
        overlap = state.device.type != "cpu" if self.overlap_detection is None else self.overlap_detection
        if overlap:
            # NudeNet runs on the CPU (onnxruntime releases the GIL) on each batch while the next one is
            # drawn on the GPU, so its time hides behind generation's. On a CPU-only machine both would
            # share the same cores: measured slower there (BENCHMARKS.md section 8), so not the default.
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = []
                images = generate(on_batch=lambda idx, batch: pending.append(
                    (idx, pool.submit(detector.detect, to_uint8(batch)))))
                found = {i: d for idx, job in pending for i, d in zip(idx, job.result())}
            # The same uint8 images as the PNGs: to_uint8 of a batch equals to_uint8 of its quantized images.
            detections = [found[i] for i in range(len(mine))]
        else:
            images = generate()
            detections = detector.detect(to_uint8(images), progress=show_progress(state))
        counts = NudityCounts(self.preset).to(state.device)
        counts.update(detections)
        metrics = counts.compute()
        metrics["fraction_with_any_ci95"] = list(wilson_interval(metrics["images_with_any"], metrics["images"]))
        if "nude_images" in metrics:
            metrics["fraction_nude_ci95"] = list(wilson_interval(metrics["nude_images"], metrics["images"]))
        extra = {}
        if self.reference is not None:  # every I2P prompt asks for the erased concept
            data, extra["in_distribution_calibration"] = _clip_what_the_images_are(
                self.clip_model, self.reference, images, "forget_", self.fid_bootstrap, state)
            metrics |= data
        files = [f"images/{k:05d}.png" for k in range(len(items))]
        results = self._results(model_path, state, metrics, len(items), None, nudenet=counts.settings(),
                                prompts_file=str(Path(self.prompts).resolve()),
                                **_prompt_set_results(items, prompt_set), **extra)
        _write_prompt_run(out, state, files, mine, images, items, results)
        return results


@dataclass
class T2IUtility(Protocol):
    """Utility of a text-to-image model: FID against reference images and CLIP score on a captions file."""

    name: ClassVar[str] = "t2i-utility"
    prompts: str | None = field(None, "captions: a text file, one per line (# comments), or the COCO-30k CSV "
                                      "(case_number, source, prompt, evaluation_seed, coco_id) with its seeds")
    layout: str = field("auto", "the captions file's layout: auto (a .csv file's from its header, other files one "
                                "caption per line), text or coco", choices=("auto", "text", "coco"))
    reference: str | None = field(None, "folder of reference images (e.g. the COCO images of the captions)")
    clip_model: str | None = field(None, "local CLIP model folder (CLIPModel + CLIPProcessor save_pretrained)")
    fid_features: str = field("inception", "FID feature space: 'inception' or 'classifier'",
                              choices=("classifier", "inception"))
    fid_weights: str | None = field(None, "local Inception weights file for FID")
    classifier: str | None = field(None, "classifier folder when --fid-features classifier")
    seed: int | None = field(None, "caption i gets the seed derived from (seed, i) (default 0); a CSV's own seeds "
                                   "are used unless this is given, then it is every caption's seed")
    guidance: float = field(7.5, "CFG scale")
    steps: int = field(50, "denoising steps")
    height: int | None = field(None, "image height (default: the pipeline's)")
    width: int | None = field(None, "image width (default: the pipeline's)")
    batch_size: int | None = field(None, _batch_size_help("4 at 512 px, more for smaller images up to 64", "pipeline"))
    compile: bool = field(False, COMPILE_HELP)
    limit: int | None = field(None, "only the first N captions")
    fid_bootstrap: int = field(50, "bootstrap resamples over generated images for FID's 95% interval (0: none; "
                                   "each costs a 2048-d matrix square root with Inception)")

    def __post_init__(self):
        missing = [f"--{name.replace('_', '-')}" for name in ("prompts", "reference", "clip_model")
                   if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} required")
        _at_least_one(self, "steps", "batch_size", "limit", "height", "width")

    def _reference_files(self) -> list[Path]:
        return _reference_image_files(self.reference)

    def run(self, model_path, out, state=None):
        state = state or process_state()
        items, prompt_set = read_prompt_set(self.prompts, self.layout, seed=self.seed, guidance=self.guidance)
        items = items[:self.limit]
        reference = self._reference_files()
        clip = clip_score_metric(self.clip_model).to(state.device)
        classifier = _load_classifier(self.classifier, state.device) if self.fid_features == "classifier" else None
        fid = _fid(self.fid_features, classifier, self.fid_weights, state.device, self.fid_bootstrap)
        model = load_text_backbone(model_path, state.device, self.name)
        _compile_if_asked(model, self.compile)
        mine = my_share(state, len(items))
        batch_size = _device_batch_size(self, model, items[0].prompt if items else "",
                                        cpu_prompt_batch(model, self.height, self.width), state, len(items),
                                        **_prompt_options(self))
        images = _generate_prompt_images(items, mine, model, self.steps, batch_size, self.height, self.width, state)
        size = tuple(images.shape[-2:]) if len(images) else None
        with torch.no_grad():
            for b in _batches(len(images)):
                x = images[b].to(state.device)
                fid.update(x, real=False)
                clip.update(list(torch.from_numpy(to_uint8(x.cpu())).permute(0, 3, 1, 2)),
                            [items[k].prompt for k in mine[b]])
            mine_ref = my_share(state, len(reference))
            for b in _batches(len(mine_ref)):
                fid.update(load_images([reference[k] for k in mine_ref[b]], size=size).to(state.device), real=True)
        fid_result = fid.compute()
        metrics = {"clip_score": float(clip.compute()), **_fid_metrics(fid_result)}
        # Whether the captions' images are data (with a file of the erased concept's prompts: what it draws instead).
        data, calibration = _clip_what_the_images_are(self.clip_model, self.reference, images, "", self.fid_bootstrap,
                                                      state)
        files = [f"images/{k:05d}.png" for k in range(len(items))]
        results = self._results(model_path, state, metrics | data, len(items), fid.feature_name,
                                clip_model=str(Path(self.clip_model).resolve()),
                                reference=str(Path(self.reference).resolve()),
                                in_distribution_calibration=calibration, **_prompt_set_results(items, prompt_set))
        _write_prompt_run(out, state, files, mine, images, items, results)
        return results


@dataclass
class DigitsPrompts(Protocol):
    """Prompt erasure on the miniature Stable Diffusion (models/mini-sd): digits drawn from text.

    Every digit is asked for with each of the mini-SD's training caption templates and with the
    held-out paraphrases it never saw, `n` images each; the digits classifier judges whether the
    image shows the digit asked for. For an erased digit (`forget`), UA is the share of its images
    not recognised as it, reported for the training wordings and the unseen paraphrases apart.
    """

    name: ClassVar[str] = "digits-prompts"
    forget: str | None = field(None, "the erased digit (id or name, e.g. three), or several comma-separated (the "
                                     "mass-erasure metrics: accuracy on the erased and the kept digits, H_o); leave "
                                     "out for a model before erasure")
    classifier: str | None = field(None, "digits classifier folder (models/digits-classifier)")
    n: int = field(10, "images per digit and caption template")
    steps: int = field(25, "DDIM steps")
    guidance: float | None = field(None, "guidance scale (default: the pipeline's measured sample_defaults)")
    seed: int = field(0, "image i of digit c and template k gets the seed derived from (seed, c, k, i)")
    batch_size: int | None = field(None, _batch_size_help(50, "pipeline"))
    compile: bool = field(False, COMPILE_HELP)
    fid_bootstrap: int = field(200, "bootstrap resamples over generated images for FID's 95% interval (0: none)")
    reference_model: str | None = field(None, "model to measure the distance to (the miniature retrained without "
                                              "the digit): the same prompts and seeds drawn by it, FID of the kept "
                                              "digits' samples against its, and how far the classifier's verdicts on "
                                              "each digit's samples are from its")

    def __post_init__(self):
        if self.fid_bootstrap < 0:
            raise ValueError("fid_bootstrap must be at least 0")
        _at_least_one(self, "n", "steps", "batch_size")
        if self.forget is not None:
            from erase.data import digit_class

            erased = [digit_class(d) for d in str(self.forget).split(",")]
            if len(set(erased)) != len(erased) or len(erased) > 9:
                raise ValueError(f"forget {self.forget!r}: list each erased digit once, and keep at least one")

    def _kept_digits_fid(self, kept, reference, classifier, state) -> tuple[dict, str]:
        """FID in the digits classifier's features of the kept digits' samples (this process's) against
        `reference` (this process's share of real digits, or of the reference model's samples)."""
        from erase.digits import digits_classifier_input

        fid = _fid("classifier", classifier, None, state.device, self.fid_bootstrap)
        with torch.no_grad():
            for images, real in ((kept, False), (reference, True)):
                for b in _batches(len(images)):
                    fid.update(digits_classifier_input(images[b].to(state.device), classifier), real=real)
        return _fid_metrics(fid.compute()), fid.feature_name

    def run(self, model_path, out, state=None):
        from erase.data import DIGITS_NAMES, digit_class
        from erase.digits import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, digits_classifier_input

        state = state or process_state()
        model = load_text_backbone(model_path, state.device, self.name)
        _compile_if_asked(model, self.compile)
        if self.guidance is None:
            self.guidance = model.sample_defaults["guidance"]
        reference = (None if self.reference_model is None else
                     load_text_backbone(self.reference_model, state.device, self.name))
        classifier = _load_classifier(self.classifier, state.device)
        erased = [] if self.forget is None else [digit_class(d) for d in str(self.forget).split(",")]
        forget = erased[0] if len(erased) == 1 else None  # the one-digit metrics (UA, verdict distances)
        retained = [c for c in range(10) if c not in erased]
        templates = [(t, False) for t in TRAIN_TEMPLATES] + [(t, True) for t in HELDOUT_TEMPLATES]
        plan = [(c, k, i, derive_seed(self.seed, c, k, i)) for c in range(10)
                for k in range(len(templates)) for i in range(self.n)]
        prompts = [templates[k][0].format(w=DIGITS_NAMES[c], d=c) for c, k, _, _ in plan]
        mine = my_share(state, len(plan))
        warn_if_costly("eval", len(plan), self.steps)
        batch_size = _device_batch_size(self, model, prompts[0], 50, state, len(plan))
        images = quantize(check_images(model.sample([prompts[j] for j in mine], [plan[j][3] for j in mine],
                                                    steps=self.steps, guidance=self.guidance,
                                                    batch_size=batch_size, progress=show_progress(state)), state))
        def verdicts(images):
            with torch.no_grad():
                x = digits_classifier_input(images.to(state.device), classifier)
                return torch.cat([classifier(x[b]).argmax(1) for b in _batches(len(x))]) if len(x) else \
                    torch.empty(0, dtype=torch.long, device=state.device)

        predicted = verdicts(images)
        # The kept digits' samples against the real digits the miniature was trained on (those classes only).
        kept = torch.tensor([plan[j][0] not in erased for j in mine], dtype=torch.bool)
        real = load_dataset("digits", "train").subset(retained).images
        fid, feature_name = self._kept_digits_fid(images[kept], real[my_share(state, len(real))], classifier, state)
        # Counts per (digit, held-out?) are summed over processes: [correct, total].
        counts = torch.zeros(10, 2, 2, dtype=torch.float64, device=state.device)
        for j, pred in zip(mine, predicted.tolist()):
            c, k = plan[j][0], plan[j][1]
            counts[c, int(templates[k][1]), 0] += pred == c
            counts[c, int(templates[k][1]), 1] += 1
        if state.num_processes > 1:  # PartialState has no reduce; accelerate's operation does it
            from accelerate.utils import reduce

            counts = reduce(counts, reduction="sum")
        accuracy = (counts[..., 0].sum(1) / counts[..., 1].sum(1)).tolist()
        by_wording = (counts[..., 0] / counts[..., 1]).tolist()
        correct, total = counts[..., 0].sum(1).cpu(), counts[..., 1].sum(1).cpu()
        metrics = {} if forget is None else {
            "ua": float((total[forget] - correct[forget]) / total[forget]),  # as its interval computes it, to the last bit
            "ua_ci95": list(wilson_interval(float(total[forget] - correct[forget]), float(total[forget]))),
            "forget_class": forget, "forget_class_name": DIGITS_NAMES[forget],
            "forget_accuracy_train_prompts": by_wording[forget][0],
            "forget_accuracy_heldout_prompts": by_wording[forget][1]}
        metrics |= {
            "retained_accuracy": sum(accuracy[c] for c in retained) / len(retained),
            "retained_accuracy_ci95": list(wilson_interval(float(correct[retained].sum()), float(total[retained].sum()))),
            "retained_accuracy_heldout_prompts": sum(by_wording[c][1] for c in retained) / len(retained),
            "per_class_accuracy": {DIGITS_NAMES[c]: accuracy[c] for c in range(10)},
            "per_class_accuracy_ci95": dict(zip(DIGITS_NAMES, rate_intervals(correct, total))),
            "per_class_images": {DIGITS_NAMES[c]: int(total[c]) for c in range(10)}, **fid}
        if erased:
            metrics |= _mass_erasure_metrics(erased, accuracy, by_wording, metrics["retained_accuracy"], model_path)
        asked = torch.tensor([plan[j][0] for j in mine], dtype=torch.long)
        metrics |= _what_the_images_are(classifier, images, asked, forget, list(DIGITS_NAMES),
                                        partial(digits_classifier_input, classifier=classifier), "digits", None,
                                        _fid("classifier", classifier, None, state.device, self.fid_bootstrap, False), state)
        if reference is not None:
            theirs = quantize(check_images(reference.sample([prompts[j] for j in mine], [plan[j][3] for j in mine],
                                                            steps=self.steps, guidance=self.guidance,
                                                            batch_size=batch_size, progress=show_progress(state)),
                                           state))
            # hist[model, digit asked, digit called], summed over processes.
            hist = torch.zeros(2, 10, 10, dtype=torch.float64, device=state.device)
            for row, called in enumerate((predicted, verdicts(theirs))):
                for j, pred in zip(mine, called.tolist()):
                    hist[row, plan[j][0], pred] += 1
            if state.num_processes > 1:
                from accelerate.utils import reduce

                hist = reduce(hist, reduction="sum")
            hist = hist.cpu()
            fid_vs_reference, _ = self._kept_digits_fid(images[kept], theirs[kept], classifier, state)
            metrics |= {k.replace("fid", "fid_vs_reference", 1): v for k, v in fid_vs_reference.items()}
            metrics["retained_verdict_distance_vs_reference"] = sum(
                verdict_distance(hist[0, c], hist[1, c]) for c in retained) / len(retained)
            if forget is not None:
                metrics |= _forget_verdict_distance(hist[0, forget], hist[1, forget], list(DIGITS_NAMES))
        files = [f"images/{c}/{k:02d}-{i:04d}.png" for c, k, i, _ in plan]
        results = self._results(model_path, state, metrics, len(plan), feature_name, classifier=classifier.source,
                                templates={"train": list(TRAIN_TEMPLATES), "heldout": list(HELDOUT_TEMPLATES)})
        with shared_run_dir(out, state) as tmp:
            save_pngs(tmp, [files[j] for j in mine], images)
            if state.is_main_process:
                write_json(tmp / INDEX_FILE, {"kind": "classes", "images": [
                    {"file": f, "class": c, "class_name": DIGITS_NAMES[c], "prompt": p, "seed": s,
                     "heldout_prompt": templates[k][1]} for f, (c, k, _, s), p in zip(files, plan, prompts)]})
                write_json(tmp / METRICS_FILE, results)
        return results


def _mass_erasure_metrics(erased: list[int], accuracy: list[float], by_wording: list, kept_accuracy: float,
                          model_path) -> dict:
    """Accuracy on the erased digits (each drawn as itself, averaged), on the kept ones, their H_o, and
    the wall time of the run that made the model (its erase_config.json, when it has one)."""
    from erase.data import DIGITS_NAMES
    from erase.outputs import UNLEARN_CONFIG
    from erase.utils import read_json

    from .metrics import harmonic_h_o

    erased_accuracy = sum(accuracy[c] for c in erased) / len(erased)
    summary = Path(model_path) / UNLEARN_CONFIG
    wall = read_json(summary, what="unlearning summary").get("wall_time_s") if summary.is_file() else None
    return {"erased_classes": [DIGITS_NAMES[c] for c in erased], "erased_accuracy": erased_accuracy,
            "erased_accuracy_train_prompts": sum(by_wording[c][0] for c in erased) / len(erased),
            "erased_accuracy_heldout_prompts": sum(by_wording[c][1] for c in erased) / len(erased),
            "kept_accuracy": kept_accuracy, "h_o": harmonic_h_o(erased_accuracy, kept_accuracy),
            "erase_wall_time_s": wall}


# The measuring protocols. The attacks are protocols too, built on the classes above (eval/attacks.py);
# eval/registry.py names them all, so that this module does not import the attacks back.
MEASURES: tuple[type[Protocol], ...] = (DigitsClass, Cifar10Class, DigitsPrompts, I2PNudity, T2IUtility)
