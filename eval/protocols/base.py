"""What every evaluation protocol shares: the results file (every setting, the model, the versions,
the command), undefined figures written as null, and the helpers each protocol uses to size its
batches, load the classifier and build its FID."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import PartialState

from erase.backbones.base import GPU_BATCH_START
from erase.config import config_dict
from erase.utils import EraseError, logger, package_versions

from ..metrics import FeatureFID, verdict_distance, verdict_distance_interval

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


def mass_erasure_metrics(erased_names: list[str], erased_accuracy: float, kept_accuracy: float, model_path) -> dict:
    """Several classes or concepts erased at once, as SPEED and MACE report it: accuracy on the erased
    ones (each drawn as itself, averaged), on the kept ones, their harmonic mean H_o, and the wall time
    of the run that made the model (its erase_config.json, when it has one)."""
    from erase.outputs import UNLEARN_CONFIG
    from erase.utils import read_json

    from ..metrics import harmonic_h_o

    summary = Path(model_path) / UNLEARN_CONFIG
    wall = read_json(summary, what="unlearning summary").get("wall_time_s") if summary.is_file() else None
    return {"erased_classes": list(erased_names), "erased_accuracy": erased_accuracy, "kept_accuracy": kept_accuracy,
            "h_o": harmonic_h_o(erased_accuracy, kept_accuracy), "erase_wall_time_s": wall}


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
