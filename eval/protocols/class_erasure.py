"""Class erasure on a class-conditional DDPM: the protocol `digits-class` and `cifar10-class` share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.config import field
from erase.data import load_dataset
from erase.sampling import class_seeds
from erase.utils import EraseError, warn_if_costly, write_json

from ..generation import check_images, my_share, process_state, quantize, save_pngs, shared_run_dir, show_progress
from ..metrics import ClassifierVerdicts, confusable_classes, rate_intervals, wilson_interval
from .base import (COMPILE_HELP, INDEX_FILE, METRICS_FILE, Protocol, _at_least_one, _batch_size_help, _batches,
                   _compile_if_asked, _device_batch_size, _fid, _fid_metrics, _forget_verdict_distance,
                   _load_classifier, mass_erasure_metrics)
from .image_checks import _what_the_images_are


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


@dataclass
class ClassErasure(Protocol):
    """Class erasure on a class-conditional DDPM (SalUn / Selective Amnesia).

    UA and the classifier's confidence on `n_forget` samples of the forgotten class; accuracy on
    `n` samples of each retained class; FID of the retained samples against the retained classes'
    training images. Without `forget` (a model before erasure) every class is retained. With several
    erased classes (`3,5,7`), UA pools their samples and the mass-erasure entries (each erased class
    drawn as itself, the kept classes, their H_o) stand beside it; the one-class entries (the
    classifier's confidence on the class, its neighbours, the verdict distance) are left out.
    """

    forget: str | None = field(None, "the erased class (id or name), or several comma-separated; leave out "
                                     "to measure a model before erasure (every class retained)")
    classifier: str | None = field(None, "classifier folder for UA and per-class accuracy (and for "
                                         "--fid-features classifier)")
    n: int = field(100, "samples per retained class (FID and accuracy)")
    n_forget: int | None = field(None, "samples of each forgotten class for UA (default: n)")
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

    @staticmethod
    def _erasure_metrics(erased, count, correct, verdicts, names, retained, model_path) -> dict:
        """UA over the erased classes' samples; with one class its confidence and entropy, with several
        the mass-erasure entries."""
        if not erased:
            return {}
        missed, drawn = float((count[erased] - correct[erased]).sum()), float(count[erased].sum())
        # The rate from the same floats as its interval, so that it never sits outside it by a rounding.
        metrics = {"ua": missed / drawn, "ua_ci95": list(wilson_interval(missed, drawn))}
        accuracy = correct / count
        if len(erased) > 1:
            return metrics | mass_erasure_metrics([names[c] for c in erased], float(accuracy[erased].mean()),
                                                  float(accuracy[retained].mean()), model_path)
        forget = erased[0]
        return metrics | {"forget_class": forget, "forget_class_name": names[forget],
                          "forget_accuracy": float(accuracy[forget]), "forget_entropy": float(verdicts["entropy"][forget]),
                          "forget_prob": float(verdicts["label_prob"][forget])}

    def _erased_classes(self, model) -> list[int]:
        erased = [] if self.forget is None else [model.class_index(c) for c in str(self.forget).split(",") if c.strip()]
        if len(set(erased)) != len(erased) or len(erased) >= model.num_classes:
            raise EraseError(f"--forget {self.forget}: list each erased class once, and keep at least one")
        return erased

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
        classifier.check_fits(model.image_shape)
        fid = _fid(self.fid_features, classifier, self.fid_weights, state.device, self.fid_bootstrap)
        erased = self._erased_classes(model)
        forget = erased[0] if len(erased) == 1 else None  # the one-class metrics
        retained = [c for c in range(model.num_classes) if c not in erased]
        reference = self._reference(retained)
        n_forget = self.n if self.n_forget is None else self.n_forget
        plan = [(c, i, s) for c in erased + retained
                for i, s in enumerate(class_seeds(self.seed, c, n_forget if c in erased else self.n))]
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
        metrics = self._erasure_metrics(erased, count, correct, v, names, retained, model_path)
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
