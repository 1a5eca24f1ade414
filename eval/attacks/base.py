"""What every attack shares: its detectors (the digits classifier, NudeNet), what the pre- and post-attack
images are (in distribution or not, as the protocols measure it), the plain and the attacked pass with
success, budget and cost, the saved attack and its replay, and the search by inversion."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from erase.config import config_dict, field
from erase.sampling import to_uint8
from erase.utils import EraseError, read_json, step_generator, write_json

from ..generation import check_images, my_share, process_state, quantize, save_pngs, shared_run_dir
from ..metrics import wilson_interval
from ..protocols.base import INDEX_FILE, METRICS_FILE, Protocol
from ..protocols.image_checks import classifier_image_sets, clip_image_sets, reference_image_files, not_measured

ATTACK_TENSORS = "attack.safetensors"
ATTACK_INFO = "attack.json"
# Random streams of the attacks, apart from the image seeds (derive_seed(seed, stream, ...)).
TARGET_STREAM, INIT_STREAM, STEP_STREAM, EVAL_STREAM = 101, 102, 103, 104


# -- detectors -----------------------------------------------------------------------------------------
class DigitDetector:
    """Success = the digits classifier recognises `digit` (grey or RGB images in [-1, 1], any size)."""

    def __init__(self, classifier, digit: int):
        self.classifier, self.digit = classifier, digit

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from erase.digits import classify_digits

        device = next(self.classifier.parameters()).device
        return (classify_digits(images.to(device), self.classifier) == self.digit).cpu()

    def describe(self) -> dict:
        return {"detector": "digits-classifier", "classifier": self.classifier.source, "digit": self.digit}


class NudityDetector:
    """Success = NudeNet finds an exposed class under a preset (its nude-image threshold if it has one)."""

    def __init__(self, preset: str, batch_size: int = 16):
        from ..metrics import NudeNet, nudenet_preset

        self.preset, self.nudenet = nudenet_preset(preset), NudeNet(batch_size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from ..metrics import count_detections

        key = "with_any" if self.preset.nude_threshold is None else "nude"
        return torch.tensor([bool(count_detections([d], self.preset)[key])
                             for d in self.nudenet.detect(to_uint8(images))], dtype=torch.bool)

    def describe(self) -> dict:
        return {"detector": "nudenet", "preset": self.preset.name}


# -- what the images are --------------------------------------------------------------------------------
# Each takes {prefix: this process's images} and returns (metrics with `{prefix}...` keys, the score's
# calibration, {prefix: per image, whether it lies among real data}); see protocols/image_checks.py.
class ClassifierImageChecks:
    """The classifier's confidence and entropy, the in-distribution share (its stage features, calibrated on
    `dataset`'s held-out split) and the FID against `dataset`'s training images: what the digits
    protocols measure for the erased class's images."""

    def __init__(self, classifier, dataset: str = "digits", root: str | None = None):
        self.classifier, self.dataset, self.root = classifier, dataset, root

    def __call__(self, sets: dict[str, torch.Tensor], bootstrap: int, state):
        from functools import partial

        from erase.digits import digits_classifier_input

        to_input = partial(digits_classifier_input, classifier=self.classifier)
        return classifier_image_sets(self.classifier, sets, to_input, self.dataset, self.root, bootstrap, state)


class ClipImageChecks:
    """The in-distribution share and FID in CLIP's image embeddings against a reference image folder
    (e.g. COCO images), as i2p-nudity and t2i-utility measure them."""

    def __init__(self, clip_model: str, reference: str):
        reference_image_files(reference)  # a wrong folder is refused before the search, not after it
        self.clip_model, self.reference = clip_model, reference

    def __call__(self, sets: dict[str, torch.Tensor], bootstrap: int, state):
        return clip_image_sets(self.clip_model, self.reference, sets, bootstrap, state)


class NoImageChecks:
    """Not measured, and metrics.json says why (never a number in its place)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self, sets: dict[str, torch.Tensor], bootstrap: int, state):
        return {}, not_measured(self.reason), {prefix: [None] * len(images) for prefix, images in sets.items()}


def _success_among_data(success: list[bool], inside: list, prefix: str) -> dict:
    """The share of units on which the detector found the concept in an image that lies among real data
    (an attack "succeeding" on blobs the classifier calls a 3 does not count), with its interval."""
    if not success or any(flag is None for flag in inside):
        return {}
    hits = sum(bool(s) and bool(i) for s, i in zip(success, inside, strict=True))
    return {f"{prefix}success_in_distribution": hits / len(success),
            f"{prefix}success_in_distribution_ci95": list(wilson_interval(hits, len(success)))}


# -- shared machinery ------------------------------------------------------------------------------------
def _gather_rows(state, rows: torch.Tensor) -> torch.Tensor:
    """Every process's rows in unit order (each process holds a contiguous slice, see `my_share`)."""
    if state.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return torch.cat(gather_object([rows.cpu()]))


def _freeze(model) -> None:
    """Attacks never train the model: no weight needs a gradient (only the attack's own tensors)."""
    for p in model.trainable_parameters("all").values():
        p.requires_grad_(False)


def load_attack(path: str | Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(attack.json, tensors) of an attack run folder; refuses one written by another attack."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / ATTACK_INFO).is_file() or not (folder / ATTACK_TENSORS).is_file():
        raise EraseError(f"--replay {folder} is not an attack run: expected {ATTACK_INFO} and {ATTACK_TENSORS} "
                         "written by `erase eval --protocol attack-...`")
    info = read_json(folder / ATTACK_INFO, what="saved attack")
    if info.get("attack") != name:
        raise EraseError(f"--replay {folder} holds a {info.get('attack')!r} attack; replay it with "
                         f"--protocol {info.get('attack')}, not {name}")
    return info, load_file(str(folder / ATTACK_TENSORS))


@dataclass
class Attack(Protocol):
    """What every attack shares: the plain and the attacked pass, success, budget, cost and the saved attack.

    A subclass sets `units` (the attack's units of work: JSON-able dicts), `plain` (pre-attack
    images of units), `search` (what the attack finds for its units: named tensors whose first
    dimension is the unit when `per_unit`) and `attacked` (post-attack images of units).
    """

    version: ClassVar[int] = 1
    per_unit: ClassVar[bool] = False  # one search per unit (shared between processes), or one for all
    budget_fields: ClassVar[tuple[str, ...]] = ()

    forget: str | None = field(None, "the erased concept: a class id or name (DDPM), a concept name or folder "
                                     "(text-to-image: three, nudity)")
    classifier: str | None = field(None, "digits classifier folder (the detector for a digit)")
    replay: str | None = field(None, "an attack run folder: evaluate the attack saved there on --model, with "
                                     "its units and seeds, without searching (transfer, or reproduction)")
    seed: int = field(0, "seed of every image and of the attack's random draws")
    fid_bootstrap: int = field(50, "bootstrap resamples for the FID of the pre- and post-attack images against "
                                   "real data (0: none)")

    def __post_init__(self):
        if self.forget is None:
            raise ValueError("--forget is required: the concept or class the attack tries to bring back")
        for name in ("n", "steps", "batch_size", "restarts", "check_every"):
            if getattr(self, name, 1) < 1:
                raise ValueError(f"{name} must be at least 1")
        if getattr(self, "attack_steps", 0) < 0:
            raise ValueError("attack_steps must be at least 0")
        if self.fid_bootstrap < 0:
            raise ValueError("fid_bootstrap must be at least 0")

    # -- what a subclass provides ----------------------------------------------------------------------
    def prepare(self, model, state) -> None:
        """Load what the attack needs (`detector`, `image_checks`, data) and refuse a model it cannot attack."""
        raise NotImplementedError

    def units(self, model) -> list[dict]:
        raise NotImplementedError

    def plain(self, model, units: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def search(self, model, units: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
        """(found tensors, a log with the loss at start and end) for `units`."""
        raise NotImplementedError

    def attacked(self, model, units: list[dict], found: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # -- the run ----------------------------------------------------------------------------------------
    def run(self, model_path, out, state=None):
        from erase.backbones import load_backbone

        state = state or process_state()
        model = load_backbone(model_path).to(state.device)
        _freeze(model)
        if getattr(self, "guidance", 0) is None:  # resolved here so that metrics.json records the value used
            self.guidance = model.sample_defaults["guidance"]
        self.prepare(model, state)
        replayed = None
        if self.replay is not None:
            replayed, found = load_attack(self.replay, self.name)
            units = replayed["units"]
        else:
            units = self.units(model)
        mine = my_share(state, len(units))
        my_units = [units[k] for k in mine]

        start = time.perf_counter()
        # A process may have no units (more processes than units); it still joins check_images' reduce.
        nothing = torch.empty(0, 1, 1, 1)
        pre = quantize(check_images(self.plain(model, my_units) if my_units else nothing, state))
        plain_s = time.perf_counter() - start
        log: dict = {}
        search_s = 0.0
        if replayed is None:
            start = time.perf_counter()
            if self.per_unit:
                found, log = self.search(model, my_units)
                found = {k: _gather_rows(state, v) for k, v in found.items()}
            else:
                found, log = self.search(model, units)
            search_s = time.perf_counter() - start
        mine_found = ({k: v[mine[0]:mine[-1] + 1] if mine else v[:0] for k, v in found.items()}
                      if self.per_unit else found)
        post = quantize(check_images(self.attacked(model, my_units, mine_found) if my_units else nothing, state))

        pre_ok = self.detector(pre).tolist() if my_units else []
        post_ok = self.detector(post).tolist() if my_units else []
        what, calibration, flags = self.image_checks({"pre_attack_": pre, "post_attack_": post}, self.fid_bootstrap,
                                                     state)
        pre_in, post_in = flags["pre_attack_"], flags["post_attack_"]
        counts = torch.tensor([sum(pre_ok), sum(post_ok), len(my_units)], dtype=torch.float32, device=state.device)
        if state.num_processes > 1:  # PartialState has no reduce; accelerate's operation does it
            from accelerate.utils import reduce

            counts = reduce(counts, reduction="sum")
            pre_ok, post_ok, pre_in, post_in = (_gather_list(v) for v in (pre_ok, post_ok, pre_in, post_in))
        n = max(float(counts[2]), 1.0)
        metrics = {
            "pre_attack_success": float(counts[0]) / n,
            "post_attack_success": float(counts[1]) / n,
            # what the images are: whether a "success" or a "failure" is drawn as data at all
            **what, **_success_among_data(pre_ok, pre_in, "pre_attack_"),
            **_success_among_data(post_ok, post_in, "post_attack_"),
            "units": len(units),
            "budget": {k: getattr(self, k) for k in self.budget_fields} | log.get("budget", {}),
            "cost": {"search_s": round(search_s, 3), "plain_sampling_s": round(plain_s, 3),
                     "search_s_per_unit": round(search_s / max(len(units), 1), 4),
                     # the search against sampling the same images plainly, both timed in this run
                     "search_to_plain_sampling": round(search_s / plain_s, 3) if plain_s > 0 else None,
                     "processes": state.num_processes},
            "search": log,
        }
        results = self._results(model_path, state, metrics, 2 * len(units), None, attack=self.name,
                                attack_version=self.version,
                                **self.detector.describe(), in_distribution_calibration=calibration,
                                replayed_from=None if replayed is None else str(Path(self.replay).resolve()))
        files = [(f"images/pre/{k:05d}.png", f"images/post/{k:05d}.png") for k in range(len(units))]
        with shared_run_dir(out, state) as tmp:
            save_pngs(tmp, [files[k][0] for k in mine], pre)
            save_pngs(tmp, [files[k][1] for k in mine], post)
            if state.is_main_process:
                write_json(tmp / INDEX_FILE, {"kind": "attack", "attack": self.name, "images": [
                    {"pre": a, "post": b, "pre_success": bool(p), "post_success": bool(q),
                     "pre_in_distribution": i, "post_in_distribution": j, **u}
                    for (a, b), p, q, i, j, u in zip(files, pre_ok, post_ok, pre_in, post_in, units)]})
                write_json(tmp / METRICS_FILE, results)
                self._save_attack(tmp, found, units, model_path)
        return results

    def _save_attack(self, folder: Path, found: dict[str, torch.Tensor], units: list[dict], model_path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in found.items()}, str(folder / ATTACK_TENSORS),
                  metadata={"attack": self.name, "version": str(self.version)})
        write_json(folder / ATTACK_INFO, {"attack": self.name, "version": self.version,
                                          "found_on": str(Path(model_path).resolve()),
                                          "settings": config_dict(self),
                                          "tensors": {k: list(v.shape) for k, v in found.items()},
                                          "units": units})


def _gather_list(values: list) -> list:
    from accelerate.utils import gather_object

    return gather_object(values)


def _check_shape(found: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A saved tensor, refused with a clear message when it cannot fit this model (transfer across models)."""
    tensor = found.get(name)
    if tensor is None or tuple(tensor.shape[-len(shape):]) != shape:
        got = None if tensor is None else tuple(tensor.shape)
        raise EraseError(f"the saved attack's {name!r} has shape {got}, this model needs (..., "
                         f"{', '.join(map(str, shape))}): replay it on a model of the same architecture")
    return tensor


def _invert(attack, start: torch.Tensor, data: torch.Tensor, loss) -> tuple[torch.Tensor, dict]:
    """Learn a vector (a condition, a token embedding) from `start` with Adam, minimising
    `loss(vector, batch, generator)` on random batches of `data`; the first start is `start` itself,
    each further one `start` plus noise of its spread. The start whose loss on one fixed batch
    (fixed noise and timesteps) is lowest is kept; the log has that loss before and after each start.
    """
    fixed = data[torch.randperm(len(data), generator=step_generator(attack.seed, EVAL_STREAM))[:attack.attack_batch]]

    def fixed_loss(vector) -> float:
        with torch.no_grad():
            return loss(vector, fixed, step_generator(attack.seed, EVAL_STREAM, 1)).item()

    best, log = None, {"restarts": []}
    for r in range(attack.restarts):
        g = step_generator(attack.seed, INIT_STREAM, r)
        noise = 0 if r == 0 else start.std() * torch.randn(start.shape, generator=g).to(start)
        vector = (start + noise).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([vector], lr=attack.attack_lr)
        losses, before = [], fixed_loss(vector)
        for step in range(attack.attack_steps):
            g = step_generator(attack.seed, STEP_STREAM, r, step)
            batch = data[torch.randint(len(data), (attack.attack_batch,), generator=g)]
            value = loss(vector, batch, g)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            losses.append(value.item())
        after = fixed_loss(vector)
        log["restarts"].append({"fixed_batch_loss_start": before, "fixed_batch_loss": after,
                                "first_losses": losses[:10], "last_losses": losses[-10:]})
        if best is None or after < best[0]:
            best = (after, vector.detach().clone())
    return best[1], log
