"""The E-step probe's table for docs/BENCHMARKS.md, from benchmarks/results/estep_probe/*.json
(written by benchmarks/estep_probe.py): the generator's own samples, then every chain, by t, c and K.

    python benchmarks/estep_table.py benchmarks/results/estep_probe/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    g = first["generator"]
    print(f"run {first['run']}, checkpoint {first['step']} (raw generator and fake score), guidance {first['guidance']}, "
          f"|J| max {first['jacobian_norm']['max']:.1f} (mean {first['jacobian_norm']['mean']:.1f}), "
          f"{first['n_per_prompt']} draws per under-specified prompt, {first['full_prompts']} full prompts\n")
    print("| t | c | gamma_z | K | TV (floor) | modes recalled | entropy ratio | accuracy (full) | rms z_K | drift rms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| - | - | 0 | 0 | {g['tv']:.3f} +- {g['tv_se']:.3f} ({g['tv_floor']:.3f}) | {g['modes_recalled']:.2f} | "
          f"{g['entropy_ratio']:.2f} | {g['accuracy']:.3f} | {g['rms_z']:.3f} | - |")
    rows = sorted((r for rep in reports for r in rep["chains"]), key=lambda r: (r["t"], r["c"], r["K"]))
    for r in rows:
        print(f"| {r['t']} | {r['c']:g} | {r['gamma_z']:.4f} | {r['K']} | {r['tv']:.3f} +- {r['tv_se']:.3f} "
              f"({r['tv_floor']:.3f}) | {r['modes_recalled']:.2f} | {r['entropy_ratio']:.2f} | {r['accuracy']:.3f} | "
              f"{r['rms_z']:.3f} | {r['drift_rms']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
