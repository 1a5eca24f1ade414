"""erase: concept erasure (machine unlearning) for diffusion models.

The Python API, in the order of the main job (reference: `erase.api`):

    import erase

    model = erase.load_model("digits-ddpm")                          # a shipped model, a folder, a hub id
    erased = erase.unlearn(model, "eupmu", forget="3", out="runs/no-three", steps=50)
    scores = erase.evaluate(erased, "digits-class", out="runs/no-three-eval", forget="3",
                            classifier="digits-classifier", n=10, n_forget=20)
    print(scores.metrics["ua"], scores.metrics["retained_accuracy"])
    erase.report([scores], "runs/report")

- `load_model` returns a backbone (`erase.backbones`), the interface every method trains through;
- `unlearn` returns an `UnlearnResult`: the unlearned model in memory, its folder, its summary;
- `evaluate` runs a named protocol and returns an `EvalResult`: metrics, settings, run folder;
  attacks on an erased model are protocols of `erase.eval` too, run the same way;
- `report` writes a side-by-side Markdown and HTML report and returns a `Report`;
- `METHODS` and `PROTOCOLS` are the registries of methods and evaluation protocols by name.

Every name is imported on first use, so `import erase` imports neither torch nor diffusers. The
command line (`erase --help`) is `erase.cli`; the training loop that `unlearn` runs is
`erase.unlearning.unlearn` (it returns the output folder; `erase.unlearning` holds the recipes and terms).
"""

from __future__ import annotations

import importlib
import pkgutil

__version__ = "0.2.0"

# Public name: the module that defines it, imported on first access.
_EXPORTS = {
    "load_model": "erase.api", "unlearn": "erase.api", "evaluate": "erase.api", "report": "erase.api",
    "UnlearnResult": "erase.api", "EvalResult": "erase.api", "Report": "erase.api",
    "METHODS": "erase.methods", "PROTOCOLS": "erase.eval.registry",
}
# The submodules are listed too, so that documentation tools (pdoc) walk them; `import erase` imports none.
__all__ = ["__version__", *_EXPORTS, "eval", *sorted(m.name for m in pkgutil.iter_modules(__path__))]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'erase' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

