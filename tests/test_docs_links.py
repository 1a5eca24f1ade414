"""Every file the repository cites exists in it: Markdown links, and repository paths named in the
docs, docstrings and comments (`erase/...`, `eval/...`, `docs/...`, `models/...`, upper-case `.md` names)."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "build", "runs", "out", ".venv", "__pycache__", ".pytest_cache", "site", "erase.egg-info"}
# Paths that exist only inside an installed wheel (pyproject.toml maps prompts/ and models/ there).
WHEEL_ONLY = {"erase/prompts", "erase/models", "erase/recipes"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./~-])((?:erase|eval|docs|models|prompts|recipes|tests|examples|\.ci)/[\w.*/-]*[\w*/])")
MD_NAME = re.compile(r"(?<![\w./-])([A-Z][A-Z_]+\.md)\b")


def repo_files(*suffixes):
    """The repository's own files: git's list where there is one (no build output, caches or runs)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    paths = ([REPO / line for line in listed.stdout.splitlines()] if listed.returncode == 0
             else [p for p in REPO.rglob("*") if not SKIP_DIRS & set(p.relative_to(REPO).parts)])
    for path in sorted(paths):
        if path.is_file() and path.suffix in suffixes:
            yield path


def exists(cited: str, base: Path) -> bool:
    cited = cited.rstrip("/.")
    if cited in WHEEL_ONLY or cited.endswith(".html"):  # .html: pages that pdoc generates
        return True
    if "*" in cited:  # a glob such as models/*-checkpoints or erase/methods/*.py
        return any(REPO.glob(cited)) or cited.startswith("models/*-checkpoints")
    return (REPO / cited).exists() or (base / cited).exists()


def test_markdown_links_point_at_files_that_exist():
    broken = []
    for md in repo_files(".md"):
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor in the same page
            if not (md.parent / target.split("#")[0]).exists():
                broken.append(f"{md.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_cited_repository_files_exist():
    missing = []
    for path in repo_files(".md", ".py", ".toml", ".txt"):
        text = path.read_text(encoding="utf-8")
        for cited in REPO_PATH.findall(text) + MD_NAME.findall(text):
            if not exists(cited, path.parent):
                missing.append(f"{path.relative_to(REPO)}: {cited}")
    assert not missing, sorted(set(missing))


def test_no_path_of_a_development_machine():
    found = [f"{p.relative_to(REPO)}" for p in repo_files(".md", ".py", ".toml", ".txt", ".json")
             if re.search(r"/work/|\.\./shared/|/home/\w+/|/root/", p.read_text(encoding="utf-8", errors="replace"))
             and p.name != Path(__file__).name]
    assert not found, found


def test_no_file_holds_a_merge_conflict_marker():
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", flags=re.M)
    marked = [str(path.relative_to(REPO)) for path in repo_files(".md", ".py", ".json", ".toml", ".txt", ".j2")
              if marker.search(path.read_text(encoding="utf-8", errors="replace"))]
    assert not marked, f"merge conflict markers left in {marked}"
