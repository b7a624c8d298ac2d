"""The tables of docs/BENCHMARKS.md's DMD-vs-EMD sections: one row per point, mean +- standard error over its seeds.

    python benchmarks/mode_table.py                      # "at equal wall-clock": benchmarks/results/mode_study
    python benchmarks/mode_table.py --points dmd emd_k8_snr
    python benchmarks/mode_table.py --results benchmarks/results/study22 --step 2000   # "at equal iterations"
    python benchmarks/mode_table.py --results benchmarks/results/study22 --curve       # every scored checkpoint
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "mode_study"
COLUMNS = {  # header -> value of one seed's report
    "iterations": lambda r: r["config"]["iterations"],
    "distill s": lambda r: r["distill_seconds"],
    "accuracy (full prompts)": lambda r: r["one_step"]["prompt_accuracy"]["all"],
    "diversity": lambda r: r["one_step"]["diversity"]["mean"],
    "shape fidelity": lambda r: r["one_step"]["shape_fidelity"]["mean"],
    "TV": lambda r: r["one_step"]["mode_coverage"]["mean"]["tv"],
    "TV floor": lambda r: r["one_step"]["mode_coverage"]["mean"]["tv_floor"],
    "modes recalled": lambda r: r["one_step"]["mode_coverage"]["mean"]["modes_recalled"],
    "entropy ratio": lambda r: r["one_step"]["mode_coverage"]["mean"]["entropy_ratio"],
}


def load(points: list[str] | None, results: Path = RESULTS, step: int | None = None) -> dict[str, list[dict]]:
    """Reports by point: files POINT_sSEED.json, or POINT_sSEED_STEP.json for the given step."""
    runs = defaultdict(list)
    pattern = re.compile(r"^(.*)_s\d+$" if step is None else rf"^(.*)_s\d+_{step}$")
    for path in sorted(results.glob("*.json")):
        match = pattern.match(path.stem)
        if match and (points is None or match.group(1) in points):
            runs[match.group(1)].append(json.loads(path.read_text()))
    return runs


def curve(results: Path) -> str:
    """TV, its floor and accuracy at every scored checkpoint of every run (convergence)."""
    lines = ["| run | step | accuracy | TV | TV floor | modes recalled | entropy ratio |", "|---" * 7 + "|"]
    for path in sorted(results.glob("*_s*_*.json"), key=lambda p: (p.stem.rsplit("_", 1)[0], int(p.stem.rsplit("_", 1)[1]))):
        r = json.loads(path.read_text())
        c = r["one_step"]["mode_coverage"]["mean"]
        lines.append(f"| {path.stem.rsplit('_', 1)[0]} | {r['step']} | {r['one_step']['prompt_accuracy']['all']:.3f} | "
                     f"{c['tv']:.3f} +- {c['tv_se']:.3f} | {c['tv_floor']:.3f} | {c['modes_recalled']:.3f} | "
                     f"{c['entropy_ratio']:.3f} |")
    return "\n".join(lines)


def cell(values: list[float]) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.3f}" if values[0] < 10 else f"{values[0]:.0f}"
    mean, se = values.mean(), values.std(ddof=1) / len(values) ** 0.5
    return f"{mean:.3f} +- {se:.3f}" if mean < 10 else f"{mean:.0f} +- {se:.0f}"


def table(runs: dict[str, list[dict]], wall_clock: bool = True) -> str:
    """One row per point; without the distill seconds where runs were resumed or shared the cores unevenly."""
    columns = {k: v for k, v in COLUMNS.items() if wall_clock or k != "distill s"}
    lines = ["| point | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, reports in runs.items():
        cells = [cell([get(r) for r in reports]) for get in columns.values()]
        lines.append(f"| {name} | {len(reports)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_prompt(runs: dict[str, list[dict]]) -> str:
    """TV per under-specified prompt (mean over seeds), to show where a point loses modes."""
    prompts = list(next(iter(runs.values()))[0]["one_step"]["mode_coverage"]["prompts"])
    lines = ["| point | " + " | ".join(f'"{p}"' for p in prompts) + " |", "|---" * (len(prompts) + 1) + "|"]
    for name, reports in runs.items():
        tv = [np.mean([r["one_step"]["mode_coverage"]["prompts"][p]["tv"] for r in reports]) for p in prompts]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in tv) + " |")
    return "\n".join(lines)


QUALITY = {  # the columns of the toy quality table (docs/BENCHMARKS.md), mean over seeds
    "colour": lambda o: o["prompt_accuracy"]["colour"],
    "shape": lambda o: o["prompt_accuracy"]["shape"],
    "background": lambda o: o["prompt_accuracy"]["background"],
    "all three": lambda o: o["prompt_accuracy"]["all"],
    "diversity 1 x 64": lambda o: o["diversity_ratio"]["mean"],
    "diversity 3 x 192": lambda o: o["diversity"]["mean"],
    "Frechet to real": lambda o: o["frechet_distance_to_real"],
}


def quality(runs: dict[str, list[dict]]) -> str:
    lines = ["| point | seeds | " + " | ".join(QUALITY) + " |", "|---" * (len(QUALITY) + 2) + "|"]
    for name, reports in runs.items():
        means = [np.mean([get(r["one_step"]) for r in reports]) for get in QUALITY.values()]
        lines.append(f"| {name} | {len(reports)} | " + " | ".join(f"{m:.3f}" if m < 10 else f"{m:.1f}"
                                                                   for m in means) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", nargs="+", default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--step", type=int, default=None, help="the checkpoint scored (files *_sSEED_STEP.json)")
    parser.add_argument("--curve", action="store_true", help="every scored checkpoint of every run")
    args = parser.parse_args()
    if args.curve:
        print(curve(args.results))
        return
    runs = load(args.points, args.results, args.step)
    # at equal iterations the cost is a separate table (docs/BENCHMARKS.md): those runs were resumed
    print(table(runs, wall_clock=args.step is None) + "\n\nTV per prompt:\n\n" + per_prompt(runs) + "\n\nQuality:\n\n" + quality(runs))


if __name__ == "__main__":
    main()
