"""`erase demo`: the main job on the shipped models, offline, on a CPU, in a few minutes.

It erases one digit from the shipped class-conditional DDPM (`models/digits-ddpm`) and the digit
"three" from the shipped miniature Stable Diffusion (`models/mini-sd`, by prompt), with the
recommended recipe (`forget`, the same file on both models; or the methods and recipes asked for),
evaluates the original, the model retrained without the digit and every erased model with the
digits classifier (`digits-class` and `digits-prompts` protocols), and writes one report (Markdown and self-contained
HTML: metrics tables, each run's verdict against its recipe's target, before/after image grids,
per-class accuracy charts). With `--attacks` it also attacks every model, the retrained ones included
(the floor), measures each model's distance to the retrained one, and writes the robustness table
(`robustness.md`). Everything it writes lives under `--out`; finished steps are
reused when it is run again.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .config import field
from .outputs import mark_output
from .resources import shipped_model
from .utils import EraseError, atomic_write_text, logger, read_json, setup_logging

SHIPPED_DDPM = shipped_model("digits-ddpm")
SHIPPED_MINI_SD = shipped_model("mini-sd")
SHIPPED_CLASSIFIER = shipped_model("digits-classifier")
# `--methods recommended`: the recommended recipe, one file for both models (recipes/forget.json).
RECOMMENDED = "recommended"
MINI_SD_CONCEPT = "three"  # prompts/three: the mini-SD's own captions of the digit 3
# The shipped models trained without any 3 (models/README.md): the floor of the robustness table.
RETRAINED = {"digits-ddpm": shipped_model("digits-ddpm-retrained-no3"),
             "mini-sd": shipped_model("mini-sd-retrained-no-three")}
RETRAINED_WITHOUT = 3
# The attacks of each model, at the budgets of BENCHMARKS.md section 7 (the units set by --attack-units).
ATTACKS = {"digits-ddpm": {"attack-class-inversion": {"steps": 25, "attack_steps": 100}},
           "mini-sd": {"attack-concept-inversion": {}, "attack-prefix": {}, "attack-ring-a-bell": {},
                       "attack-null-latent": {}}}


@dataclass
class DemoConfig:
    methods: str = field(RECOMMENDED, "what erases: 'recommended' (the recommended recipe, forget), a method or a "
                                      "shipped recipe (`erase recipes`), several comma-separated, or 'all' (every "
                                      "method, the full comparison)")
    forget: str = field("3", "the digit erased from the DDPM (id or name); the mini-SD always forgets 'three'")
    mini_sd: bool = field(True, "also erase 'three' from the miniature Stable Diffusion")
    steps: int | None = field(None, "unlearning steps of every method and of every stage of a recipe (default: "
                                    "each method's or recipe's own; fewer is a quick trial, not the measured result)")
    n: int = field(30, "DDPM evaluation samples per retained digit")
    n_forget: int = field(100, "DDPM evaluation samples of the erased digit (UA)")
    prompt_images: int = field(4, "mini-SD evaluation images per digit and caption template (11 templates)")
    concept_images: int = field(200, "mini-SD training images generated per forget/anchor/retain set "
                                     "(the papers: 800; fewer keeps the demo short)")
    seed: int = field(0, "seed of the unlearning runs and the evaluation samples")
    workers: int | None = field(None, "processes sharing the work (default: 2 on a CPU with two or more cores, 1 on "
                                      "a GPU); images and numbers do not depend on it")
    attacks: bool = field(False, "also attack every model (class-embedding inversion on the DDPM; concept inversion, "
                                 "adversarial prefix, Ring-A-Bell and null-latent inversion on the mini-SD), the "
                                 "models retrained without the digit 3 included, measure each model's distance to "
                                 "the retrained one, and write the robustness table (minutes per model)")
    attack_units: int = field(20, "images or prompts per attack (BENCHMARKS.md section 7: 50 on the DDPM, 40 on "
                                  "the mini-SD)")

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.attack_units < 1:
            raise ValueError(f"attack_units must be at least 1, got {self.attack_units}")

    def method_list(self) -> list[str]:
        """The names asked for ('recommended' stays a name until `erasers` replaces it)."""
        from .methods import parse_methods
        from .unlearning.recipe import shipped_recipes

        return parse_methods(self.methods, also={"recipes": sorted(shipped_recipes()),
                                                    "the recommended recipe": [RECOMMENDED]})

    def erasers(self) -> list[str]:
        """The methods and recipes run on each model, 'recommended' replaced by the recommended recipe."""
        from .unlearning.recipe import DEFAULT_RECIPE

        return list(dict.fromkeys(DEFAULT_RECIPE if m == RECOMMENDED else m for m in self.method_list()))


def _done(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


def _evaluate(protocol_cls, model: Path, out: Path, **settings) -> dict:
    if not _done(out, "metrics.json"):
        protocol_cls(**settings).run(model, out)
    return read_json(out / "metrics.json", what="eval results")["metrics"]


def _sections(config: DemoConfig) -> dict[str, tuple]:
    """Per model: (report title, shipped model, what is erased, protocol, unlearn options, eval settings)."""
    from erase.eval.protocols import DigitsClass, DigitsPrompts

    sections = {"digits-ddpm": (f"Digits DDPM: digit {config.forget} erased", SHIPPED_DDPM, config.forget,
                                DigitsClass, {}, dict(n=config.n, n_forget=config.n_forget, steps=25))}
    if config.mini_sd:
        sections["mini-sd"] = ("Miniature Stable Diffusion: 'three' erased by prompt (training wordings and unseen "
                               "paraphrases)", SHIPPED_MINI_SD, MINI_SD_CONCEPT, DigitsPrompts,
                               {"images": config.concept_images}, dict(n=config.prompt_images))
    return sections


def _retrained(config: DemoConfig, key: str) -> Path | None:
    """The shipped model retrained without what this section erases, if there is one."""
    from .data import digit_class

    erased = RETRAINED_WITHOUT if key == "mini-sd" else digit_class(config.forget)
    return RETRAINED[key] if erased == RETRAINED_WITHOUT else None


def _reference_names(config: DemoConfig, key: str) -> list[str]:
    """The section's shipped models in the demo: the original, and the one retrained without what is
    erased where one ships (a match-retrain recipe is judged against it)."""
    return ["original", *(["retrained"] if _retrained(config, key) else [])]


def _erase(config: DemoConfig, name: str, shipped: Path, forget: str, model: Path, options: dict) -> None:
    """Erase `forget` from `shipped` into `model` with a method or a shipped recipe."""
    from .unlearning import unlearn
    from .unlearning.recipe import load_recipe, shipped_recipes

    if name not in shipped_recipes():
        steps = {} if config.steps is None else {"steps": config.steps}
        unlearn(shipped, name, forget, model, seed=config.seed, **steps, **options)
        return
    recipe = name  # by name, so that the run records the `erase unlearn --recipe NAME` command
    if config.steps is not None:  # a quick trial: every stage shortened, the recipe's name kept
        recipe = load_recipe(name).to_dict()
        for stage in recipe["stages"]:
            stage["config"] = {**stage.get("config", {}), "steps": config.steps}
    unlearn(shipped, forget=forget, out=model, recipe=recipe, seed=config.seed, **options)


def _model(out: Path, key: str, name: str, shipped: Path, retrained: Path | None) -> Path:
    return {"original": shipped, "retrained": retrained}.get(name) or out / key / "models" / name


def _attack(config: DemoConfig, out: Path, key: str, name: str, model: Path, shipped: Path, forget: str) -> None:
    """Every attack of the section on one model; then, for an erased model, its distance to the retrained one."""
    from erase.eval.registry import get_protocol

    for attack, budget in ATTACKS[key].items():
        run = out / key / "attacks" / attack / name
        if not _done(run, "metrics.json"):
            # The text attacks' target images come from the original model, whatever model is attacked.
            original = {} if key == "digits-ddpm" else {"reference_model": str(shipped)}
            get_protocol(attack)(forget=forget, classifier=str(SHIPPED_CLASSIFIER), n=config.attack_units,
                                 seed=config.seed, **original, **budget).run(model, run)
    retrained = _retrained(config, key)
    if retrained is not None and name != "retrained":
        *_, protocol, _, eval_settings = _sections(config)[key]
        _evaluate(protocol, model, out / key / "distance" / name, forget=forget, classifier=str(SHIPPED_CLASSIFIER),
                  seed=config.seed, reference_model=str(retrained), **eval_settings)


def _run_part(config: DemoConfig, out: Path, key: str, methods: list[str], threads: int | None = None) -> None:
    """Erase with each of `methods` ("original" / "retrained": the shipped ones) and evaluate (and
    attack, with --attacks): one independent part of the demo.

    Parts write only their own folders, and the concept cache is generated by the one part that
    trains on the mini-SD, so parts can run in parallel processes.
    """
    import torch

    if threads is not None:  # a worker process: the demo's threads are shared out among the workers
        setup_logging()
        torch.set_num_threads(threads)
    _, shipped, forget, protocol, unlearn_options, eval_settings = _sections(config)[key]
    for name in methods:
        model = _model(out, key, name, shipped, _retrained(config, key))
        if name not in ("original", "retrained") and not _done(model, "erase_config.json"):
            logger.info("demo: erasing %s from %s with %s", forget, shipped.name, name)
            _erase(config, name, shipped, forget, model, unlearn_options)
        _evaluate(protocol, model, out / key / "eval" / name, forget=forget,
                  classifier=str(SHIPPED_CLASSIFIER), seed=config.seed, **eval_settings)
        if config.attacks:
            _attack(config, out, key, name, model, shipped, forget)


def default_workers() -> int:
    """Two processes on a CPU with two or more cores, else one.

    The shipped models are so small that much of a UNet call is Python overhead, which a second
    torch thread does not share; two processes of one thread each keep both cores busy instead.
    On a GPU one process keeps the device busy.
    """
    import torch

    return 1 if torch.cuda.is_available() or (os.cpu_count() or 1) < 2 else 2


def run_demo(config: DemoConfig, out: str | Path) -> dict:
    """Run the demo into `out`; returns {"report": path, "rows": [summary rows]}.

    The work falls into independent parts (per model: the original's evaluation, and the erasure
    and evaluation with every method), run by `config.workers` processes (default: `default_workers()`).
    Images and numbers do not depend on how many: every part is seeded on its own and runs with the
    same number of torch threads.
    """
    import torch

    from erase.eval.report import build_report

    sections = _sections(config)
    config.method_list()  # an unknown method or recipe is refused before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "demo")  # at the start: the demo fills the folder step by step and reuses finished steps
    start = time.perf_counter()
    # Longest first, so that two workers finish together: training runs before originals' evaluations.
    parts = ([(key, config.erasers()) for key in reversed(sections)]
             + [(key, _reference_names(config, key)) for key in reversed(sections)])
    workers = min(config.workers or default_workers(), len(parts))
    # On the CPU, a backward pass sums gradients in an order set by the number of torch threads, so
    # every part gets the same number whatever `workers` is: the default share of the cores.
    threads = max(1, torch.get_num_threads() // default_workers())
    if workers == 1:
        all_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for key, part_methods in parts:
                _run_part(config, out, key, part_methods)
        finally:
            torch.set_num_threads(all_threads)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_run_part, config, out, key, part_methods, threads) for key, part_methods in parts]
            try:
                for future in futures:
                    future.result()  # re-raises a part's error here
            except BaseException:
                pool.shutdown(cancel_futures=True)  # parts not started yet are dropped
                raise

    rows, report_sections, robustness = [], {}, []
    for key, (title, *_rest) in sections.items():
        runs = []
        names = _reference_names(config, key) + config.erasers()
        for name in names:
            run = out / key / "eval" / name
            metrics = read_json(run / "metrics.json", what="eval results")["metrics"]
            rows.append({"model": key, "method": name, "ua": metrics["ua"],
                         "retained_accuracy": metrics["retained_accuracy"]})
            runs.append(run)
        if config.attacks:
            runs += [out / key / "attacks" / attack / name for attack in ATTACKS[key] for name in names]
            robustness.append(_robustness_table(config, out, key, title, names))
        report_sections[title] = runs

    intro = (f"erase demo: {config.methods} ({', '.join(config.erasers())}); "
             "digits classifier models/digits-classifier. "
             "UA: share of images of the erased digit that the classifier does not recognise as it (higher is "
             "more forgetting); retained accuracy: mean accuracy on the other digits (higher is better kept).")
    md, html = build_report(report_sections, out / "report", title="erase demo", intro=intro)
    result = {"report": html, "markdown": md, "rows": rows}
    if config.attacks:
        result["robustness"] = out / "robustness.md"
        atomic_write_text(result["robustness"], ROBUSTNESS_INTRO + "\n".join(robustness))
    return result | {"seconds": time.perf_counter() - start}


ROBUSTNESS_INTRO = """# erase demo: robustness

Each erased model next to the original and the model retrained without the digit 3 (the floor: what
an attack gets from a model that never saw a 3). UA and retained accuracy: the nominal evaluation;
each attack: pre-attack → post-attack success (the detector is the digits classifier), the share of
units broken with an image that lies among real digits ("among data": a blob the classifier calls a 3
does not count) and, in brackets, the search's time over sampling the same units plainly in the same
run. Distance to the
retrained model: total-variation distance between the classifier's verdicts on the erased digit's
samples and the retrained model's from the same seeds (0: the same digits in the same shares), and
the FID of the kept digits' samples against its.

"""


def _robustness_table(config: DemoConfig, out: Path, key: str, title: str, names: list[str]) -> str:
    """One Markdown table: a row per model, nominal figures, every attack, the distance to retrained."""
    def metrics(folder: Path) -> dict:
        return read_json(folder / "metrics.json", what="eval results")["metrics"] if folder.is_dir() else {}

    def pct(value) -> str:
        return "—" if value is None else f"{100 * value:.1f}%"

    attacks = list(ATTACKS[key])
    header = ["model", "UA", "retained acc.", *attacks, "verdicts vs retrained (TV)", "FID vs retrained"]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name in names:
        nominal, distance = metrics(out / key / "eval" / name), metrics(out / key / "distance" / name)
        cells = [name, pct(nominal.get("ua")), pct(nominal.get("retained_accuracy"))]
        for attack in attacks:
            a = metrics(out / key / "attacks" / attack / name)
            ratio = a["cost"]["search_to_plain_sampling"]
            among_data = a.get("post_attack_success_in_distribution")
            cells.append(f"{pct(a['pre_attack_success'])} → **{pct(a['post_attack_success'])}**"
                         + ("" if among_data is None else f", among data {pct(among_data)}")
                         + ("" if ratio is None else f" ({ratio:.1f}x)"))
        if name == "retrained":
            cells += ["0 (itself)", "0 (itself)"]
        else:
            tv, fid = distance.get("forget_verdict_distance_vs_reference"), distance.get("fid_vs_reference")
            cells += ["—" if tv is None else f"{tv:.2f}", "—" if fid is None else f"{fid:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    units = f"{config.attack_units} units per attack, seed {config.seed}"
    return "\n".join(lines) + f"\n\n{units}; the attacks' budgets are in each attack run's metrics.json.\n"


def _cmd_demo(args) -> None:
    from .config import build_config

    config = build_config(DemoConfig, {}, args)
    result = run_demo(config, args.out)
    width = max(len("method or recipe"), *(len(r["method"]) for r in result["rows"]))
    print(f"{'model':<12} {'method or recipe':<{width}} {'UA':>6} {'retained acc':>13}")
    for r in result["rows"]:
        print(f"{r['model']:<12} {r['method']:<{width}} {r['ua']:>6.3f} {r['retained_accuracy']:>13.3f}")
    if "robustness" in result:
        print(f"robustness table: {result['robustness']}")
    print(f"report: {result['report']} (and {result['markdown']}), {result['seconds']:.0f} s")


def add_commands(subparsers) -> None:
    from .config import add_dataclass_arguments

    p = subparsers.add_parser("demo")
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo); finished steps are reused")
    add_dataclass_arguments(p, DemoConfig)
    p.set_defaults(func=_cmd_demo)
