"""Side-by-side reports of `erase eval` runs: a Markdown file and a self-contained HTML file.

The HTML embeds every figure as base64, so it can be mailed or attached to an issue as one file.
Runs made with different protocols or settings are still shown, under a warning that lists the
settings that differ: their numbers are not comparable.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from erase.outputs import mark_output  # noqa: E402
from erase.sampling import make_grid  # noqa: E402
from erase.utils import EraseError, atomic_dir, atomic_write_text, read_json  # noqa: E402

from .generation import load_images  # noqa: E402
from .protocols import INDEX_FILE, METRICS_FILE  # noqa: E402

GRID_COLUMNS = 8  # images per class (or prompts per row) in a run's grid
GRID_PROMPTS = 16  # prompt images shown per run


class Run:
    """One `erase eval` output folder: its results and its image index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise EraseError(f"run folder not found: {self.path}")
        self.results = read_json(self.path / METRICS_FILE, what="eval results (written by `erase eval`)")
        self.index = read_json(self.path / INDEX_FILE, what="image index (written by `erase eval`)")
        if not isinstance(self.results, dict) or not isinstance(self.results.get("metrics"), dict) \
                or not isinstance(self.index, dict) or not isinstance(self.index.get("images"), list):
            raise EraseError(f"{self.path} is not an `erase eval` run: its {METRICS_FILE} needs a 'metrics' object "
                             f"and its {INDEX_FILE} an 'images' list")
        self.name = self.path.name

    def scalar_metrics(self) -> dict[str, float | int]:
        return {k: v for k, v in self.results["metrics"].items() if isinstance(v, (int, float))}

    def caption(self) -> str:
        """What the grid shows: one row per class, or the prompts of its images in reading order."""
        if self.index.get("kind") == "classes":
            names = dict(sorted({e["class"]: e["class_name"] for e in self.index["images"]}.items()))
            return f"{self.name}: one row per class ({', '.join(names.values())})"
        prompts = [e["prompt"] for e in self.index["images"][:GRID_PROMPTS]]
        return f"{self.name}: " + "; ".join(f"{k + 1}. {p}" for k, p in enumerate(prompts))

    def grid(self) -> Image.Image:
        """Up to GRID_COLUMNS images per class, one row per class; or the first prompts' images."""
        entries = self.index["images"]
        if self.index.get("kind") == "classes":
            rows: dict[int, list[str]] = {}
            for e in entries:
                rows.setdefault(e["class"], []).append(e["file"])
            columns = min(GRID_COLUMNS, max(len(v) for v in rows.values()))
            files = []
            for c in sorted(rows):
                chosen = rows[c][:columns]
                files += chosen + [None] * (columns - len(chosen))
            n_rows = len(rows)
        else:
            files = [e["file"] for e in entries[:GRID_PROMPTS]]
            n_rows = -(-len(files) // GRID_COLUMNS)
        images = load_images([self.path / f for f in files if f is not None])
        blank = -torch.ones_like(images[0])
        it = iter(images)
        ordered = torch.stack([next(it) if f is not None else blank for f in files])
        return make_grid(ordered, rows=n_rows, scale=max(1, 48 // ordered.shape[-1]))


def _differences(runs: list[Run]) -> list[str]:
    """Settings (and protocol, feature extractor) that are not the same in every run."""
    keys = ["protocol", "feature_extractor"]
    values = [{k: r.results.get(k) for k in keys} | r.results.get("settings", {}) for r in runs]
    every = sorted({k for v in values for k in v}, key=lambda k: (k not in keys, k))
    return [k for k in every if len({repr(v.get(k)) for v in values}) > 1]


def _bar_chart(title: str, ylabel: str, labels: list[str], series: dict[str, list[float]]) -> Image.Image:
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(labels) * max(1, len(series))), 3.2), dpi=100)
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width - 0.4 + width / 2 for i in range(len(labels))], values, width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(max(labels, key=len)) > 6 else 0, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _charts(runs: list[Run]) -> dict[str, Image.Image]:
    charts = {}
    with_acc = [r for r in runs if "per_class_accuracy" in r.results["metrics"]]
    if with_acc:
        labels = list(with_acc[0].results["metrics"]["per_class_accuracy"])
        charts["per-class-accuracy"] = _bar_chart(
            "classifier accuracy per class", "accuracy", labels,
            {r.name: [r.results["metrics"]["per_class_accuracy"].get(c, float("nan")) for c in labels]
             for r in with_acc})
    with_nude = [r for r in runs if "detections_per_class" in r.results["metrics"]]
    if with_nude:
        labels = list(with_nude[0].results["metrics"]["detections_per_class"])
        charts["nudenet-counts"] = _bar_chart(
            "NudeNet detections per class", "detections", [c.replace("_EXPOSED", "") for c in labels],
            {r.name: [r.results["metrics"]["detections_per_class"][c] for c in labels] for r in with_nude})
    return charts


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def _metrics_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    names = []
    for r in runs:
        names += [k for k in r.scalar_metrics() if k not in names]
    rows = [[k] + [_fmt(r.scalar_metrics().get(k)) for r in runs] for k in names]
    for key in ("protocol", "feature_extractor", "model"):
        rows.append([key] + [_fmt(r.results.get(key)) for r in runs])
    return ["metric"] + [r.name for r in runs], rows


def _png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _section(runs: list[Run], title: str | None, number: int) -> tuple[list[str], list[str], dict]:
    """One section's Markdown lines, HTML parts and figures: metrics table, warning, grids, charts."""
    header, rows = _metrics_table(runs)
    differ = _differences(runs)
    prefix = f"{number}-" if title else ""
    figures = {f"{prefix}grid-{i}-{r.name.replace('/', '_')}": (r.grid(), r.caption()) for i, r in enumerate(runs)}
    figures |= {f"{prefix}{name}": (chart, name.replace("-", " ")) for name, chart in _charts(runs).items()}
    warning = (f"Not comparable: these settings differ between runs: {', '.join(differ)}."
               if differ and len(runs) > 1 else "")
    md, parts = [], []
    if title:
        md += [f"## {title}", ""]
        parts.append(f"<h2>{html.escape(title)}</h2>")
    if warning:
        md += [f"**{warning}**", ""]
        parts.append(f"<p class='warn'>{html.escape(warning)}</p>")
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("</table>")
    md += ["", "### Images and charts" if title else "## Images and charts", ""]
    parts.append("<h3>Images and charts</h3>" if title else "<h2>Images and charts</h2>")
    for name, (_, caption) in figures.items():
        md += [f"![{name}](figures/{name}.png)", "", f"*{caption}*", ""]
    return md, parts, figures


def build_report(runs: list[str | Path] | dict[str, list[str | Path]], out: str | Path,
                 title: str = "Evaluation report", intro: str = "") -> tuple[Path, Path]:
    """Write OUT/report.md (figures beside it) and OUT/report.html (figures embedded).

    `runs` is a list of run folders (one table), or {section title: run folders} for a report of
    several sections, each with its own table and comparability check (e.g. `erase demo`'s two models).
    """
    sections = runs if isinstance(runs, dict) else {None: runs}
    if not sections or not all(sections.values()):
        raise EraseError("give at least one run folder to report on")
    md = [f"# {title}", ""] + ([intro, ""] if intro else [])
    html_parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                  "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
                  "td,th{border:1px solid #aaa;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
                  ".warn{color:#a00;font-weight:bold}figure{display:inline-block;margin:1em}img{max-width:100%}"
                  "</style></head><body>",
                  f"<h1>{html.escape(title)}</h1>"] + ([f"<p>{html.escape(intro)}</p>"] if intro else [])
    figures: dict[str, tuple[Image.Image, str]] = {}
    for number, (section_title, run_dirs) in enumerate(sections.items(), 1):
        loaded = [Run(p) for p in run_dirs]
        if len({r.name for r in loaded}) < len(loaded):  # runs/a/out and runs/b/out: tell them apart by path
            for r in loaded:
                r.name = str(r.path)
        section_md, section_html, section_figures = _section(loaded, section_title, number)
        md += section_md
        html_parts += section_html
        html_parts += [f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
                       f"{_png_base64(image)}'><figcaption>{html.escape(caption)}</figcaption></figure>"
                       for name, (image, caption) in section_figures.items()]
        figures |= section_figures
    html_parts.append("</body></html>")

    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "figures").mkdir()
        for name, (image, _) in figures.items():
            image.save(tmp / "figures" / f"{name}.png")
        atomic_write_text(tmp / "report.md", "\n".join(md) + "\n")
        atomic_write_text(tmp / "report.html", "\n".join(html_parts) + "\n")
        mark_output(tmp, "report")
    return out / "report.md", out / "report.html"
