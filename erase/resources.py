"""Where the shipped files are: the prompt sets (`prompts/`), the small models (`models/`) and the
recipes (`recipes/`).

In a source checkout or an editable install they are the repository's top-level folders; a wheel
(`pip install .`) carries the same folders inside the package, as `erase/prompts`, `erase/models` and `erase/recipes`
(pyproject.toml maps them with package-dir, as it maps `eval/` to `erase.eval`).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SHIPPED_MODELS = ("digits-ddpm", "digits-classifier", "mini-sd", "mini-flow",
                  # trained without the digit 3: the retrained references (floors) of the robustness tables
                  "digits-ddpm-retrained-no3", "mini-sd-retrained-no-three", "mini-flow-retrained-no-three")


def shipped(folder: str) -> Path:
    """The shipped `models`, `prompts` or `recipes` folder: the installed copy, else the repository's."""
    installed = PACKAGE / folder
    return installed if installed.is_dir() else PACKAGE.parent / folder


def shipped_model(name: str) -> Path:
    """The folder of a shipped model (one of SHIPPED_MODELS)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"{name!r} is not a shipped model; the shipped ones are {', '.join(SHIPPED_MODELS)}")
    return shipped("models") / name


def model_location(source):
    """A shipped model's folder for its name (`digits-ddpm`), unless a path of that name exists; any
    other source as given. The command line and the Python API both go through here."""
    if str(source) in SHIPPED_MODELS and not Path(source).exists():
        return shipped_model(str(source))
    return source
