"""`digits-prompts`: prompt erasure on the miniature Stable Diffusion, digits drawn from text."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from erase.config import field
from erase.data import load_dataset
from erase.utils import derive_seed, warn_if_costly, write_json

from ..generation import (check_images, load_text_backbone, my_share, process_state, quantize, save_pngs,
                          shared_run_dir, show_progress)
from ..metrics import rate_intervals, verdict_distance, wilson_interval
from .base import (COMPILE_HELP, INDEX_FILE, METRICS_FILE, Protocol, _at_least_one, _batch_size_help, _batches,
                   _compile_if_asked, _device_batch_size, _fid, _fid_metrics, _forget_verdict_distance,
                   _load_classifier, mass_erasure_metrics)
from .image_checks import _what_the_images_are


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
    """The shared mass-erasure entries, with the erased digits' accuracy on each wording apart."""
    from erase.data import DIGITS_NAMES

    return {**mass_erasure_metrics([DIGITS_NAMES[c] for c in erased], sum(accuracy[c] for c in erased) / len(erased),
                                   kept_accuracy, model_path),
            "erased_accuracy_train_prompts": sum(by_wording[c][0] for c in erased) / len(erased),
            "erased_accuracy_heldout_prompts": sum(by_wording[c][1] for c in erased) / len(erased)}
