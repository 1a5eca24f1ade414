"""Whether a protocol's images are data at all, beside whether the classifier recognises them: the
in-distribution score (in the classifier's stage features, or CLIP's image embeddings against a
reference image set) and the FID of the erased class's images against real data. The attacks score
their pre- and post-attack images with the same functions (`classifier_image_sets`,
`clip_image_sets`)."""

from __future__ import annotations

from pathlib import Path

import torch

from erase.data import IMAGE_SUFFIXES, load_dataset
from erase.utils import EraseError, logger

from ..generation import load_images
from ..metrics import (IN_DISTRIBUTION_K, ClipImageFeatures, FeatureFID, InDistribution, bootstrap_fid,
                       confidence_entropy, fid_of_moments, in_distribution_metrics, moments)
from .base import _batches, _fid, _fid_metrics


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


def _per_image_checks(classifier, x: torch.Tensor, in_distribution: InDistribution
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image of a batch of classifier inputs: the classifier's confidence (its largest probability),
    the entropy of its probabilities, and whether the image lies within the real data's radius."""
    with torch.no_grad():
        confidence, entropy = confidence_entropy(classifier(x))
        inside = in_distribution.inside(classifier.stage_features(x))
    return confidence.cpu(), entropy.cpu(), inside


def _image_checks(classifier, x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  in_distribution: InDistribution) -> torch.Tensor:
    """Per requested class, sums over a batch of classifier inputs: [images, confidence (the largest
    probability), entropy, images within the real data's radius], a (4, classes) float64 tensor."""
    confidence, entropy, inside = _per_image_checks(classifier, x, in_distribution)
    labels = labels.cpu()
    sums = torch.zeros(4, num_classes, dtype=torch.float64)
    ones = torch.ones(len(labels), dtype=torch.float64)
    for row, values in enumerate((ones, confidence, entropy, inside.double())):
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


def _forget_fid(images: torch.Tensor, real: torch.Tensor, fid: FeatureFID, to_input, device, state,
                prefix: str = "forget_") -> dict:
    """FID of the erased class's images (every process's) against real data, as `{prefix}fid*` entries.
    Every process computes it whole, from the gathered images and without the metric's own
    synchronisation: a process may hold none of the class's images, and a metric synchronised from a
    process that was never updated does not match the others' collective."""
    images = _gather_features(images, state)
    with torch.no_grad():
        for batch, is_real in ((images, False), (real, True)):
            for b in _batches(len(batch)):
                fid.update(to_input(batch[b].to(device)), real=is_real)
    return {k.replace("fid", f"{prefix}fid", 1): v for k, v in _fid_metrics(fid.compute()).items()}


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


def classifier_image_sets(classifier, sets: dict[str, torch.Tensor], to_input, dataset: str, root: str | None,
                           bootstrap: int, state) -> tuple[dict, dict, dict[str, list[bool]]]:
    """What each set of images is (this process's share of each; the attacks' pre- and post-attack
    images), as the class and prompt protocols measure the erased class's: the classifier's mean
    confidence and entropy, the share within the real data's radius and the FID against every real
    training image, as `{prefix}...` entries for each `sets` key (the prefix). Returns the metrics, the
    calibration's description and, per set, whether each of this process's images lies among real data."""
    in_distribution = _classifier_in_distribution(classifier, dataset, root, to_input, state.device)
    real = load_dataset(dataset, "train", root=root).images
    metrics, flags = {}, {}
    for prefix, images in sets.items():
        checks = [_per_image_checks(classifier, to_input(images[b].to(state.device)), in_distribution)
                  for b in _batches(len(images))]
        confidence, entropy, inside = (torch.cat(c) for c in zip(*checks)) if checks else (torch.zeros(0),) * 3
        total, confidence_sum, entropy_sum, inside_sum = _reduce_sum(torch.tensor(
            [len(images), float(confidence.sum()), float(entropy.sum()), float(inside.sum())], dtype=torch.float64),
            state).tolist()
        if total > 0:
            metrics |= {f"{prefix}confidence": confidence_sum / total, f"{prefix}entropy": entropy_sum / total,
                        **in_distribution_metrics(inside_sum, total, prefix)}
        fid = _fid("classifier", classifier, None, state.device, bootstrap, sync=False)
        metrics |= _forget_fid(images, real, fid, to_input, state.device, state, prefix)
        flags[prefix] = inside.tolist()
    return metrics, in_distribution.describe() | {"features": "classifier stage features", "dataset": dataset}, flags


def not_measured(reason: str) -> dict:
    """How a results file says that the in-distribution score was not measured, and why (never a number)."""
    return {"measured": False, "reason": reason}


def reference_image_files(folder: str | Path) -> list[Path]:
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


class _ClipReference:
    """A reference image set (e.g. COCO images) in CLIP's image embeddings, and the in-distribution score
    calibrated on it: its radius set on every other reference image (sorted by path), the rest being
    the real data it measures distance to. `score` is None when the folder is too small for it."""

    def __init__(self, clip_model: str, reference: str, size: tuple[int, int] | None, state):
        self.clip = ClipImageFeatures(clip_model, state.device)
        self.folder = str(Path(reference).resolve())
        files = reference_image_files(reference)
        self.real = torch.cat([self.clip(load_images(files[b], size=size)) for b in _batches(len(files), 64)])
        self.score = None
        if len(files) >= 2 * (IN_DISTRIBUTION_K + 1):
            self.score = InDistribution.calibrate(self.real[0::2], self.real[1::2])
        else:
            logger.warning("%d reference images are too few for the in-distribution score (it needs %d: half of "
                           "them set its radius, the other half are the real data): not measured", len(files),
                           2 * (IN_DISTRIBUTION_K + 1))

    def describe(self) -> dict:
        if self.score is None:
            return not_measured(f"{len(self.real)} reference images are too few (the score needs "
                                f"{2 * (IN_DISTRIBUTION_K + 1)})") | {"reference_images": len(self.real)}
        return self.score.describe() | {"features": self.clip.name, "reference": self.folder}

    def metrics(self, images: torch.Tensor, prefix: str, bootstrap: int, state) -> tuple[dict, list[bool]]:
        """The in-distribution share of `images` (this process's; every process's counted) and their FID
        against every reference image (`{prefix}clip_fid`); and whether each of this process's images is in."""
        if self.score is None:
            return {}, [None] * len(images)
        ours = torch.cat([self.clip(images[b]) for b in _batches(len(images), 64)]) if len(images) else self.real[:0]
        inside = self.score.inside(ours)
        counts = _reduce_sum(torch.tensor([float(inside.sum()), float(len(ours))], dtype=torch.float64), state)
        metrics = in_distribution_metrics(float(counts[0]), float(counts[1]), prefix)
        every = _gather_features(ours, state)
        if len(every) >= 2:
            real_mean, real_cov = moments(self.real)
            metrics |= {f"{prefix}clip_fid": fid_of_moments(*moments(every), real_mean, real_cov),
                        f"{prefix}clip_fid_samples": len(every), f"{prefix}clip_fid_min_samples": self.real.shape[1],
                        f"{prefix}clip_fid_reliable": len(every) >= self.real.shape[1],
                        f"{prefix}clip_fid_ci95": list(bootstrap_fid(every, real_mean, real_cov, bootstrap))
                        if bootstrap > 0 else None}
        return metrics, inside.tolist()


def clip_what_the_images_are(clip_model: str, reference: str, images: torch.Tensor, prefix: str, bootstrap: int,
                              state) -> tuple[dict, dict]:
    """Whether a text-to-image protocol's images (this process's) are data, against a reference image set
    (e.g. COCO images) in CLIP's image embeddings: the in-distribution score and the FID of the images
    against every reference image in the same features (`{prefix}clip_fid`). Returns the metrics and the
    calibration's description (saying "not measured" where the folder is too small for the score)."""
    reference_set = _ClipReference(clip_model, reference, tuple(images.shape[-2:]) if len(images) else None, state)
    metrics, _ = reference_set.metrics(images, prefix, bootstrap, state)
    return metrics, reference_set.describe()


def clip_image_sets(clip_model: str, reference: str, sets: dict[str, torch.Tensor], bootstrap: int,
                     state) -> tuple[dict, dict, dict[str, list[bool]]]:
    """`clip_what_the_images_are` for several sets of images of one size (the attacks' pre- and
    post-attack images), the reference embedded once: metrics, calibration, per-set per-image flags."""
    size = next((tuple(x.shape[-2:]) for x in sets.values() if len(x)), None)
    reference_set = _ClipReference(clip_model, reference, size, state)
    metrics, flags = {}, {}
    for prefix, images in sets.items():
        found, flags[prefix] = reference_set.metrics(images, prefix, bootstrap, state)
        metrics |= found
    return metrics, reference_set.describe(), flags


def _reduce_sum(tensor: torch.Tensor, state) -> torch.Tensor:
    if state.num_processes > 1:
        from accelerate.utils import reduce

        return reduce(tensor.to(state.device), reduction="sum").cpu()
    return tensor
