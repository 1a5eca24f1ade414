"""The built wheel is enough on its own: installed into a fresh virtual environment, offline, it runs
`erase demo` (shortened) with the prompt sets and shipped models it carries."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_demo_offline(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(REPO)], timeout=600)
    wheel, = (tmp_path / "dist").glob("erase-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300)
    python = venv / "bin" / "python"
    # The dependencies (torch, diffusers, ...) come from this interpreter's site-packages, listed in a
    # .pth file: its .pth files are not run, so the editable install of this checkout stays invisible.
    new_site = Path(run([str(python), "-c", "import site; print(site.getsitepackages()[0])"]).stdout.strip())
    dep_dirs = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    (new_site / "dependencies.pth").write_text("\n".join(dep_dirs) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)], timeout=600)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ERASE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": ""}
    env.pop("ERASE_PROMPTS", None)
    work = tmp_path / "work"  # not the repository: nothing may be found through the working folder
    work.mkdir()
    where = run([str(python), "-c", "import erase, erase.eval; print(erase.__file__); print(erase.eval.__file__)"],
                cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    out = run([str(venv / "bin" / "erase"), "demo", "--out", "demo", "--steps", "5", "--n", "2", "--n-forget", "4",
               "--prompt-images", "1", "--concept-images", "4"], cwd=work, env=env, timeout=900).stdout
    assert "report: demo/report/report.html" in out
    # the recommended recipe from the wheel's recipes/, on the wheel's own mini-sd
    config = json.loads((work / "demo" / "mini-sd" / "models" / "forget" / "erase_config.json").read_text())
    assert [s["steps"] for s in config["stages"]] == [5, 5] and Path(config["base_model"]).is_relative_to(venv)
    assert (work / "demo" / "report" / "report.md").is_file()
    recipes = run([str(venv / "bin" / "erase"), "recipes"], cwd=work, env=env).stdout  # the wheel's recipes/
    assert "class-match-retrain" in recipes and "forget (version 3, target forget)" in recipes


def test_every_python_package_of_the_source_is_in_the_wheel():
    """A subpackage missing from pyproject's list imports in a checkout but not from the wheel (as
    `erase.edits` once did): every folder of erase/ and eval/ with an __init__.py is listed."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    folders = {"erase." + ".".join(p.parent.relative_to(REPO / "erase").parts) if p.parent != REPO / "erase"
               else "erase" for p in (REPO / "erase").rglob("__init__.py")}
    folders |= {"erase.eval" + "".join("." + part for part in p.parent.relative_to(REPO / "eval").parts)
                for p in (REPO / "eval").rglob("__init__.py")}
    assert folders <= listed, sorted(folders - listed)
