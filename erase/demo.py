"""`erase demo`: the main job on the shipped models, offline, on a CPU, in a few minutes.

It erases one digit from the shipped class-conditional DDPM (`models/digits-ddpm`) and the digit
"three" from the shipped miniature Stable Diffusion (`models/mini-sd`, by prompt), with the
recommended method or several, evaluates the original and every erased model with the digits
classifier (`digits-class` and `digits-prompts` protocols), and writes one report (Markdown and
self-contained HTML: metrics tables, before/after image grids, per-class accuracy charts).
Everything it writes lives under `--out`; finished steps are reused when it is run again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .config import field
from .outputs import mark_output
from .utils import logger, read_json

REPO = Path(__file__).resolve().parent.parent
SHIPPED_DDPM = REPO / "models" / "digits-ddpm"
SHIPPED_MINI_SD = REPO / "models" / "mini-sd"
SHIPPED_CLASSIFIER = REPO / "models" / "digits-classifier"
# The method with the best measured trade-off on both shipped models (BENCHMARKS.md).
RECOMMENDED = "eupmu"
MINI_SD_CONCEPT = "three"  # prompts/three: the mini-SD's own captions of the digit 3


@dataclass
class DemoConfig:
    methods: str = field(RECOMMENDED, "method, comma-separated methods, or 'all' (every method, the full comparison)")
    forget: str = field("3", "the digit erased from the DDPM (id or name); the mini-SD always forgets 'three'")
    mini_sd: bool = field(True, "also erase 'three' from the miniature Stable Diffusion")
    steps: int | None = field(None, "unlearning steps (default: each method's own)")
    n: int = field(30, "DDPM evaluation samples per retained digit")
    n_forget: int = field(100, "DDPM evaluation samples of the erased digit (UA)")
    prompt_images: int = field(4, "mini-SD evaluation images per digit and caption template (11 templates)")
    concept_images: int = field(200, "mini-SD training images generated per forget/anchor/retain set "
                                     "(the papers: 800; fewer keeps the demo short)")
    seed: int = field(0, "seed of the unlearning runs and the evaluation samples")

    def method_list(self) -> list[str]:
        from .methods import parse_methods

        return parse_methods(self.methods)


def _done(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


def _evaluate(protocol_cls, model: Path, out: Path, **settings) -> dict:
    if not _done(out, "metrics.json"):
        protocol_cls(**settings).run(model, out)
    return read_json(out / "metrics.json", what="eval results")["metrics"]


def run_demo(config: DemoConfig, out: str | Path) -> dict:
    """Run the demo into `out`; returns {"report": path, "rows": [summary rows]}."""
    from erase.eval.protocols import DigitsClass, DigitsPrompts
    from erase.eval.report import build_report

    from .unlearn import unlearn

    methods = config.method_list()
    steps = {} if config.steps is None else {"steps": config.steps}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "demo")  # at the start: the demo fills the folder step by step and reuses finished steps
    start = time.perf_counter()
    rows, sections = [], {}

    def erase_and_evaluate(key: str, shipped: Path, forget: str, protocol, unlearn_options: dict,
                           eval_settings: dict) -> list[Path]:
        """The original and each method's erased model, each evaluated; returns the eval folders."""
        runs = []
        for method in [None, *methods]:
            name = method or "original"
            model = shipped if method is None else out / key / "models" / name
            if method is not None and not _done(model, "erase_config.json"):
                logger.info("demo: erasing %s from %s with %s", forget, shipped.name, method)
                unlearn(shipped, method, forget, model, seed=config.seed, **steps, **unlearn_options)
            run = out / key / "eval" / name
            metrics = _evaluate(protocol, model, run, forget=forget, classifier=str(SHIPPED_CLASSIFIER),
                                seed=config.seed, **eval_settings)
            rows.append({"model": key, "method": name, "ua": metrics["ua"],
                         "retained_accuracy": metrics["retained_accuracy"]})
            runs.append(run)
        return runs

    sections[f"Digits DDPM: digit {config.forget} erased"] = erase_and_evaluate(
        "digits-ddpm", SHIPPED_DDPM, config.forget, DigitsClass, {},
        dict(n=config.n, n_forget=config.n_forget, steps=25))
    if config.mini_sd:
        sections["Miniature Stable Diffusion: 'three' erased by prompt (training wordings and unseen "
                 "paraphrases)"] = erase_and_evaluate(
            "mini-sd", SHIPPED_MINI_SD, MINI_SD_CONCEPT, DigitsPrompts, {"images": config.concept_images},
            dict(n=config.prompt_images))

    intro = (f"erase demo: methods {', '.join(methods)}; digits classifier models/digits-classifier. "
             "UA: share of images of the erased digit that the classifier does not recognise as it (higher is "
             "more forgetting); retained accuracy: mean accuracy on the other digits (higher is better kept).")
    md, html = build_report(sections, out / "report", title="erase demo", intro=intro)
    elapsed = time.perf_counter() - start
    return {"report": html, "markdown": md, "rows": rows, "seconds": elapsed}


def _cmd_demo(args) -> None:
    from .config import build_config

    config = build_config(DemoConfig, {}, args)
    result = run_demo(config, args.out)
    print(f"{'model':<12} {'method':<10} {'UA':>6} {'retained acc':>13}")
    for r in result["rows"]:
        print(f"{r['model']:<12} {r['method']:<10} {r['ua']:>6.3f} {r['retained_accuracy']:>13.3f}")
    print(f"report: {result['report']} (and {result['markdown']}), {result['seconds']:.0f} s")


def add_commands(subparsers) -> None:
    from .config import add_dataclass_arguments

    p = subparsers.add_parser("demo", help="erase a digit from both shipped models, evaluate, write a report")
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo); finished steps are reused")
    add_dataclass_arguments(p, DemoConfig)
    p.set_defaults(func=_cmd_demo)
