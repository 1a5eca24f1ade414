"""The Python API, exported at the top of the package (`erase.load_model`, `erase.unlearn`, ...).

Each function is the Python side of one command (`erase unlearn`, `erase eval`, `erase report`) and
returns an object rather than only a path. Heavy modules (torch, diffusers) are imported inside the
functions, so that `import erase` stays cheap.

Attacks on an erased model (recovering the concept with adversarial prompts or embeddings) run as
evaluation protocols of `erase.eval`: `evaluate(model, ATTACK_PROTOCOL, ...)`; a dedicated `attack`
function, when it exists, belongs here beside `evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .resources import model_location as _model_location




def load_model(source: str | Path, **kwargs):
    """Load a model as a backbone (`erase.backbones`): the interface every method trains through.

    `source` is a shipped model name (`digits-ddpm`, `mini-sd`), a folder written by this package,
    a diffusers Stable Diffusion pipeline folder, a single `.safetensors`/`.ckpt` checkpoint, or a
    Hub id (`CompVis/stable-diffusion-v1-4`). Keyword arguments go to the Stable Diffusion loader
    (`frozen_dtype=`, ...). The backbone samples (`model.sample(...)`) and saves
    (`model.save_pretrained(folder)`).
    """
    from .backbones import load_backbone

    return load_backbone(_model_location(source), **kwargs)


@dataclass
class UnlearnResult:
    """What `unlearn` returns: the unlearned model, in memory, and the folder it was saved to."""

    model: Any  #: the unlearned backbone (the loaded model, trained in place)
    path: Path  #: the output folder: the model, `delta.safetensors` (the changed tensors), `erase_config.json`
    summary: dict  #: the contents of `erase_config.json`: config, parameter group, losses, timings, versions

    @property
    def method(self) -> str:
        return self.summary["method"]

    @property
    def config(self) -> dict:
        """Every setting of the run, defaults included (a recipe's: each stage's, in `summary["stages"]`)."""
        return self.summary.get("config", {})


def unlearn(model, method: str | None = None, forget=None, out: str | Path | None = None, *, recipe=None,
            **options) -> UnlearnResult:
    """Erase `forget` from `model` with `method` (`erase.METHODS`, or a closed-form edit of
    `erase.edits.EDITS`: `uce`, `speed`) or a `recipe`, and save the result to `out`.

    `model` is a backbone from `load_model` (trained in place) or anything `load_model` takes.
    `forget` is a class id or name, comma-separated ones, for a class-conditional model; a concept
    name (`nudity`, `three`: a folder of `prompts/`), a concept folder or a literal prompt for Stable
    Diffusion, or several concepts (a comma-separated list, a file of names, a mass-erasure CSV:
    `erase.concept_sets`), erased together with each one's loss logged apart. `recipe` is a shipped recipe's name (`erase recipes`), a recipe file or a dict: its
    stages run one after the other into `out`; with neither a method nor a recipe, the recommended
    recipe `forget` runs. With a method, `options` are the method's config
    fields (`steps=50`, `lr=1e-4`, `w_lr=10`: see `erase unlearn --method NAME --help`), its
    `terms=` (`erase.unlearning.terms`) and the loop's keywords (`retain=`, `anchor=`, `images=`,
    `resume=`, ...: see `erase.unlearning.unlearn`). The same (model, method or recipe, options,
    seed) gives the same weights.
    """
    from .unlearning import CONFIG_FILE
    from .unlearning import unlearn as run_unlearning
    from .utils import read_json

    if isinstance(model, (str, Path)):
        model = load_model(model)
    path = Path(run_unlearning(model, method, forget, out, recipe=recipe, **options))
    return UnlearnResult(model=model, path=path, summary=read_json(path / CONFIG_FILE, what="unlearning summary"))


@dataclass
class EvalResult:
    """What `evaluate` returns: the protocol's metrics and the run folder holding its images."""

    path: Path  #: the run folder: `metrics.json`, `index.json`, `images/`
    results: dict  #: the contents of `metrics.json`: settings, model, versions, metrics

    @property
    def protocol(self) -> str:
        return self.results["protocol"]

    @property
    def metrics(self) -> dict:
        """The numbers (e.g. `ua`, `retained_accuracy`, `fid`), with their intervals where the protocol has them."""
        return self.results["metrics"]

    @property
    def settings(self) -> dict:
        """Every setting that decided the numbers: two runs compare only when these agree."""
        return self.results["settings"]


def evaluate(model: str | Path | UnlearnResult, protocol: str, out: str | Path, overwrite: bool = False,
             **settings) -> EvalResult:
    """Evaluate a saved model with a named protocol (`erase.PROTOCOLS`) and write the run to `out`.

    `model` is an `UnlearnResult`, a model folder or a shipped model name. `settings` are the
    protocol's fields (`forget="3"`, `n=30`: see `erase eval --protocol NAME --help`); a shipped
    model name is accepted for `classifier` (`classifier="digits-classifier"`).
    """
    import dataclasses

    from .config import build_config
    from .eval.cli import default_classifier, evaluate_recorded
    from .eval.protocols import METRICS_FILE
    from .eval.registry import get_protocol
    from .utils import EraseError, read_json

    if isinstance(model, UnlearnResult):
        model = model.path
    elif not isinstance(model, (str, Path)):
        raise EraseError("evaluate takes a saved model: an UnlearnResult, a model folder or a shipped model name "
                         "(save an in-memory model with model.save_pretrained(folder) first)")
    protocol_cls = get_protocol(protocol)
    if "classifier" in {f.name for f in dataclasses.fields(protocol_cls)}:
        settings["classifier"] = default_classifier(protocol_cls.name, settings.get("classifier"))
    config = build_config(protocol_cls, settings)
    evaluate_recorded(config, str(model), out, overwrite)
    return EvalResult(path=Path(out), results=read_json(Path(out) / METRICS_FILE, what="eval results"))


@dataclass
class Report:
    """What `report` returns: the Markdown report (figures beside it) and the self-contained HTML one."""

    markdown: Path
    html: Path


def report(runs, out: str | Path, title: str = "Evaluation report", overwrite: bool = False) -> Report:
    """Compare evaluation runs side by side in `out` (`report.md`, `report.html`).

    `runs` is a list of `EvalResult`s or run folders (one table), or {section title: list} for a
    report of several sections. Runs whose settings differ are shown under a warning naming them.
    """
    from .eval.cli import report_recorded
    from .eval.report import build_report

    def folders(items):
        return [r.path if isinstance(r, EvalResult) else r for r in items]

    if isinstance(runs, dict):  # sections chosen by the caller: no one command makes this report
        markdown, html = build_report({k: folders(v) for k, v in runs.items()}, out, title=title)
    else:
        markdown, html = report_recorded(folders(runs), out, overwrite, title=title)
    return Report(markdown=Path(markdown), html=Path(html))
