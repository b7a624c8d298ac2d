"""The E-step probe's tables for docs/BENCHMARKS.md, from the JSON files benchmarks/estep_probe.py wrote for one
checkpoint: the generator's own samples, then every chain, by the teacher's guidance inside the chain, t, c and K;
then, from a `--denoising-only` file, (F1)'s error of the fake score and of the teacher on the generator's samples.

    python benchmarks/estep_table.py benchmarks/results/estep_probe/dmd_s0_2000_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def chains_table(reports: list[dict]) -> None:
    first = reports[0]
    g = first["generator"]
    print(f"run {first['run']}, checkpoint {first['step']} (raw generator and fake score), guidance {first['guidance']}, "
          f"|J| max {first['jacobian_norm']['max']:.1f} (mean {first['jacobian_norm']['mean']:.1f}), "
          f"{first['n_per_prompt']} draws per under-specified prompt, {first['full_prompts']} full prompts\n")
    print("| chain guidance | t | c | gamma_z | K | TV (floor) | modes recalled | entropy ratio | accuracy (full) | rms z_K "
          "| drift rms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| - | - | - | 0 | 0 | {g['tv']:.3f} +- {g['tv_se']:.3f} ({g['tv_floor']:.3f}) | {g['modes_recalled']:.2f} | "
          f"{g['entropy_ratio']:.2f} | {g['accuracy']:.3f} | {g['rms_z']:.3f} | - |")
    rows = [{"w": rep.get("chain_guidance", rep["guidance"]), **r} for rep in reports for r in rep["chains"]]
    for r in sorted(rows, key=lambda r: (-r["w"], r["t"], r["c"], r["K"])):
        print(f"| {r['w']:g} | {r['t']} | {r['c']:g} | {r['gamma_z']:.4f} | {r['K']} | {r['tv']:.3f} +- {r['tv_se']:.3f} "
              f"({r['tv_floor']:.3f}) | {r['modes_recalled']:.2f} | {r['entropy_ratio']:.2f} | {r['accuracy']:.3f} | "
              f"{r['rms_z']:.3f} | {r['drift_rms']:.2f} |")


def denoising_table(rows: list[dict]) -> None:
    print("\n| t | (F1) error: fake score | teacher, w = 1 | teacher, guided | fake below teacher (w = 1) | rms delta |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gain = 1 - r["mse_fake"] / r["mse_teacher_conditional"]
        print(f"| {r['t']} | {r['mse_fake']:.4f} | {r['mse_teacher_conditional']:.4f} | {r['mse_teacher_guided']:.4f} | "
              f"{100 * gain:.1f}% | {r['delta_rms']:.3f} |")


def main(paths: list[str]) -> None:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    with_chains = [r for r in reports if r.get("chains")]
    if with_chains:
        chains_table(with_chains)
    for report in reports:
        if "denoising" in report:
            denoising_table(report["denoising"])


if __name__ == "__main__":
    main(sys.argv[1:])
