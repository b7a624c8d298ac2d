"""The table of docs/BENCHMARKS.md, "DMD vs EMD at equal wall-clock", from benchmarks/results/mode_study/*.json
(written by benchmarks/mode_study.sh): one row per point, mean +- standard error over its seeds.

    python benchmarks/mode_table.py                      # every point
    python benchmarks/mode_table.py --points dmd emd_k8_snr
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


def load(points: list[str] | None) -> dict[str, list[dict]]:
    runs = defaultdict(list)
    for path in sorted(RESULTS.glob("*_s*.json")):
        name = re.sub(r"_s\d+$", "", path.stem)
        if points is None or name in points:
            runs[name].append(json.loads(path.read_text()))
    return runs


def cell(values: list[float]) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.3f}" if values[0] < 10 else f"{values[0]:.0f}"
    mean, se = values.mean(), values.std(ddof=1) / len(values) ** 0.5
    return f"{mean:.3f} +- {se:.3f}" if mean < 10 else f"{mean:.0f} +- {se:.0f}"


def table(runs: dict[str, list[dict]]) -> str:
    lines = ["| point | seeds | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, reports in runs.items():
        cells = [cell([get(r) for r in reports]) for get in COLUMNS.values()]
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
    args = parser.parse_args()
    runs = load(args.points)
    print(table(runs) + "\n\nTV per prompt:\n\n" + per_prompt(runs) + "\n\nQuality:\n\n" + quality(runs))


if __name__ == "__main__":
    main()
