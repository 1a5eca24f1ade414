"""The Python API: `import erase` is cheap, the README's Python example runs, the reference docs build."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, "the README holds one Python example"
    return blocks[0]


def test_import_erase_and_its_api_import_neither_torch_nor_diffusers():
    code = ("import sys, erase\n"
            "assert callable(erase.load_model) and callable(erase.evaluate) and callable(erase.report)\n"
            "assert erase.UnlearnResult and erase.EvalResult and erase.Report\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_erase_unlearn_is_the_api_function(monkeypatch, tmp_path):
    import erase
    from erase import api

    assert erase.unlearn is api.unlearn
    calls = []
    monkeypatch.setattr(api, "unlearn", lambda *a, **k: calls.append((a, k)) or "result")
    monkeypatch.delitem(vars(erase), "unlearn")  # the first access cached the original: look it up again
    assert erase.unlearn("model", "eupmu", forget="3", out=tmp_path, steps=1) == "result"
    assert calls == [(("model", "eupmu"), {"forget": "3", "out": tmp_path, "steps": 1})]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    result = subprocess.run([sys.executable, "-c", readme_python()], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ua = re.search(r"UA ([\d.]+) -> ([\d.]+)", result.stdout)
    assert ua, result.stdout
    assert float(ua.group(2)) > float(ua.group(1))  # the digit is less recognisable after erasure
    assert (tmp_path / "runs" / "py-report" / "report.html").is_file()
    assert (tmp_path / "runs" / "py-no-three" / "delta.safetensors").is_file()


def test_reference_docs_build_without_warnings(tmp_path):
    result = subprocess.run([sys.executable, "-W", "error", "-m", "pdoc", "-o", str(tmp_path / "site"), "erase"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr[-3000:]
    pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("*.html")}
    assert {"erase.html", "erase/api.html", "erase/methods/eupmu.html", "erase/eval/protocols.html"} <= pages
    assert "UnlearnResult" in (tmp_path / "site" / "erase" / "api.html").read_text()
