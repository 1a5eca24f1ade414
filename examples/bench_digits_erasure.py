"""Digit erasure over several seeds: every method forgets one digit; writes BENCHMARKS.md's tables.

    python examples/bench_digits_erasure.py --out runs/bench-digits --seeds 0,1,2
    python examples/bench_digits_erasure.py --model models/mini-sd --protocol digits-prompts \
        --forget three --out runs/bench-mini-sd --seeds 0,1,2

A thin driver of the tool's own commands, so that every figure comes from the same path a user
runs: for each unlearning seed s and each method, `erase unlearn ... --seed s`, then
`erase eval --protocol P --seed s` (digits-class on the class-conditional DDPM, digits-prompts on
the text-to-image miniatures; the evaluation's sampling seed varied with it; the
original model is evaluated at every seed too), then `erase report` over the first seed's runs.
The table aggregates the seeds: mean UA, retained and neighbour accuracy with a two-level
bootstrap interval (seeds, then images: `erase.eval.metrics.seed_bootstrap_rate`), FID with
Student's t over seeds where the protocol measures one (refused when any seed's FID rests on too
few images), and a verdict
against the target decided on those intervals. Finished steps are reused (delete their folder to
redo one); `--set METHOD.OPTION=V1,V2` adds sweep rows; `--cost-rounds N` adds each method's step
cost as a ratio to finetune, from `erase bench`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
import sys
from pathlib import Path

from erase.cli import main as erase
from erase.eval.metrics import seed_bootstrap_rate, t_interval
from erase.eval.report import Target
from erase.methods import METHODS
from erase.utils import read_json, setup_logging, write_json

log = logging.getLogger("bench")


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def runs_to_do(methods: list[str], sets: list[str]) -> list[tuple[str, str | None, dict]]:
    """(run name, method, options): each method with its defaults, plus the --set grids."""
    runs = [(m, None if m == "original" else m, {}) for m in methods]
    grids: dict[str, dict[str, list]] = {}
    for item in sets:
        key, _, values = item.partition("=")
        method, _, option = key.partition(".")
        if method not in METHODS or not option or not values:
            raise SystemExit(f"--set expects METHOD.OPTION=V1,V2,..., got {item!r}")
        grids.setdefault(method, {})[option] = [parse_value(v) for v in values.split(",")]
    for method, grid in grids.items():
        for combo in itertools.product(*grid.values()):
            options = dict(zip(grid, combo))
            runs.append((f"{method}[{','.join(f'{k}={v}' for k, v in options.items())}]", method, options))
    return runs


def run_command(args: list[str]) -> None:
    """One `erase` command, run in this process exactly as the command line would run it."""
    log.info("$ erase %s", shlex.join(args))
    if erase(args) != 0:
        raise SystemExit(f"failed: erase {shlex.join(args)}")


def options_as_flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v).lower()
                                                   if isinstance(v, bool) else str(v))]


def unlearn_and_evaluate(run: str, method: str | None, options: dict, seed: int, out: Path, args) -> Path:
    """The run's model for `seed` (the shipped model for the original) and its eval folder."""
    folder = out / run / f"seed-{seed}"
    model = Path(args.model)
    if method is not None:
        model = folder / "model"
        if not (model / "erase_config.json").is_file():
            run_command(["unlearn", "--model", args.model, "--method", method, "--forget", args.forget,
                         "--out", str(model), "--seed", str(seed), *args.unlearn_option, *options_as_flags(options)])
    evaluation = folder / "eval"
    if not (evaluation / "metrics.json").is_file():
        run_command(["eval", "--model", str(model), "--protocol", args.protocol, "--forget", args.forget,
                     "--classifier", args.classifier, "--seed", str(seed), "--out", str(evaluation),
                     *args.eval_option])
    return evaluation


def aggregate(evals: list[Path], forget: str | None, neighbours: list[str] | None) -> dict:
    """Mean over seeds with 95% intervals, from each run's per-class counts (so the original model,
    evaluated without an erased class, gets its UA and neighbour accuracy on the same classes)."""
    metrics = [read_json(e / "metrics.json")["metrics"] for e in evals]

    def rate(names: list[str], wrong: bool = False) -> tuple[float, float, float]:
        counts = [(sum(m["per_class_accuracy"][c] * m["per_class_images"][c] for c in names),
                   sum(m["per_class_images"][c] for c in names)) for m in metrics]
        return seed_bootstrap_rate([n - k if wrong else k for k, n in counts], [n for _, n in counts])

    retained = [c for c in metrics[0]["per_class_accuracy"] if c != forget]
    row = {"seeds": len(evals), "retained_accuracy": rate(retained)}
    if forget is not None:
        row["ua"] = rate([forget], wrong=True)
        if all(forget in m.get("per_class_in_distribution", {}) for m in metrics):
            # The share of the erased class's images that are data at all (docs/protocols.md).
            inside = [round(m["per_class_in_distribution"][forget] * m["per_class_images"][forget]) for m in metrics]
            row["forget_in_distribution"] = seed_bootstrap_rate(inside, [m["per_class_images"][forget]
                                                                         for m in metrics])
    if neighbours:
        row["neighbour_accuracy"] = rate(neighbours)
    if "fid" not in metrics[0]:  # the text protocols judge by the classifier only
        return row
    reliable = all(m.get("fid_reliable", True) for m in metrics)
    fids = [m["fid"] for m in metrics]
    # One seed has no interval over seeds (Student's t needs two).
    row["fid"] = None if not reliable else (t_interval(fids, floor=0.0) if len(fids) > 1 else (fids[0], None, None))
    row["fid_samples"] = metrics[0]["fid_samples"]
    return row


def verdict(row: dict, original: dict | None, target: Target) -> str:
    if "ua" not in row or original is None:
        return ""
    _, ua_lo, ua_hi = row["ua"]
    floor = original["retained_accuracy"][0] - target.retained_drop
    _, r_lo, r_hi = row["retained_accuracy"]
    # As the report decides: erased only where the erased class's images are data (not measured: unclear).
    _, data_lo, data_hi = row.get("forget_in_distribution") or (None, -1.0, 2.0)
    erased = ua_lo >= target.ua and data_lo >= target.in_distribution
    if ua_hi < target.ua or r_hi < floor or (ua_lo >= target.ua and data_hi < target.in_distribution):
        return "misses"
    if erased and r_lo >= floor:
        return "meets"
    return "undecided"


def pct(interval) -> str:
    if interval is None:
        return "—"
    mean, lo, hi = interval
    return f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(rows: dict[str, dict], cost: dict[str, float], command: str, settings: dict, target: Target) -> str:
    original = rows.get("original")
    lines = [f"Produced by `{command}`; protocol `{settings['protocol']}` of erase {settings['erase']} "
             f"({settings['settings']}); 95% intervals over seeds and images. Target: {target.describe()}.", "",
             "| run | seeds | UA (%) | erased class in distribution (%) | retained acc (%) | Δ retained (pts) "
             "| neighbour acc (%) | feature FID | verdict |" + (" step cost vs finetune |" if cost else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if cost else "")]
    for run, r in rows.items():
        delta = f"{100 * (r['retained_accuracy'][0] - original['retained_accuracy'][0]):+.1f}" if original else ""
        fid = "—" if "fid" not in r else "refused (too few images)" if r["fid"] is None else (
            f"{r['fid'][0]:.2f}" + (f" [{r['fid'][1]:.2f}, {r['fid'][2]:.2f}]" if r["seeds"] > 1 else ""))
        method = run.split("[")[0]
        # Without --cost-rounds the column is left out (an empty column reads as unmeasured rows).
        ratio = (f" {cost[method] / cost['finetune']:.2f}x |" if method in cost and "finetune" in cost else " |"
                 ) if cost else ""
        lines.append(f"| {run} | {r['seeds']} | {pct(r.get('ua'))} | {pct(r.get('forget_in_distribution'))} | "
                     f"{pct(r['retained_accuracy'])} | {delta} | "
                     f"{pct(r.get('neighbour_accuracy'))} | {fid} | {verdict(r, original, target)} |{ratio}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/digits-ddpm")
    p.add_argument("--classifier", default="models/digits-classifier")
    p.add_argument("--forget", default="3", help="the digit to erase: a class id (digits-class) or a concept "
                   "such as three (digits-prompts)")
    p.add_argument("--protocol", default="digits-class", choices=("digits-class", "digits-prompts"))
    p.add_argument("--methods", default=",".join(["original", *METHODS]),
                   help="comma list; 'original' is the unmodified model (default: it and every method)")
    p.add_argument("--seeds", default="0,1,2", help="unlearning seeds; each run's evaluation uses the same seed")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=V1,V2", help="sweep grid rows")
    p.add_argument("--unlearn-option", action="append", default=[], metavar="--FLAG=VALUE",
                   help="extra `erase unlearn` option for every method, e.g. --unlearn-option=--steps=50")
    p.add_argument("--eval-option", action="append", default=[], metavar="--FLAG=VALUE",
                   help="extra `erase eval` option, e.g. --eval-option=--n-forget=500 (default: the protocol's)")
    p.add_argument("--out", default="runs/bench-digits")
    p.add_argument("--cost-rounds", type=int, default=0, help="interleaved timing rounds of `erase bench` (0 skips)")
    args = p.parse_args(argv)
    setup_logging()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    todo = runs_to_do([m for m in args.methods.split(",") if m], args.set)

    evals = {run: [unlearn_and_evaluate(run, method, options, s, out, args) for s in seeds]
             for run, method, options in todo}
    erased = [read_json(e[0] / "metrics.json")["metrics"] for e in evals.values()]
    erased = next((m for m in erased if "forget_class_name" in m), {})
    rows = {run: aggregate(e, erased.get("forget_class_name"), erased.get("neighbour_classes"))
            for run, e in evals.items()}
    run_command(["report", *[str(e[0]) for e in evals.values()], "--out", str(out / "report")])

    cost = {}
    if args.cost_rounds:
        timed = ["finetune"] + [m for _, m, _ in todo if m not in (None, "finetune")]
        run_command(["bench", "--model", args.model, "--forget", args.forget, "--methods", ",".join(dict.fromkeys(timed)),
                     "--rounds", str(args.cost_rounds), "--out", str(out / "cost")])
        cost = {m["method"]: m["seconds_per_step"] for m in read_json(out / "cost" / "bench.json")["methods"]}
    results = read_json(next(iter(evals.values()))[0] / "metrics.json")
    settings = {"erase": results["versions"]["erase"], "protocol": args.protocol,
                "settings": ", ".join(f"{k} {v}" for k, v in results["settings"].items()
                                      if k in ("n", "n_forget", "steps", "guidance", "eta", "batch_size"))}
    command = shlex.join(["python", "examples/bench_digits_erasure.py", *(sys.argv[1:] if argv is None else argv)])
    table = markdown(rows, cost, command, settings, Target())
    write_json(out / "aggregate.json", rows)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
