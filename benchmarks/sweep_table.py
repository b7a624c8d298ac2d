"""Print the toy sweep (benchmarks/results/sweep/*.json, written by toy_sweep.sh) as the table in docs/BENCHMARKS.md.

    python benchmarks/sweep_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

from emd_t2i.training.config import DEFAULT_TARGET_MODULES

SWEEP = Path(__file__).parent / "results" / "sweep"
DEFAULTS = {"num_langevin_steps": 4, "gamma_eps": 0.5, "gamma_z": 0.03, "generator_lr": 3e-4, "fake_lr": 3e-4,
            "generator_rank": 16, "fake_rank": 16, "fake_updates": 1, "batch_size": 32, "ema_decay": 0.0,
            "cancel_initial_noise": False, "weighting": "dmd", "guidance_scale": 3.0, "t_star": 999,
            "lr_schedule": "constant"}
SHORT = {"num_langevin_steps": "K", "generator_lr": "lr_g", "fake_lr": "lr_f", "generator_rank": "rank_g",
         "fake_rank": "rank_f", "fake_updates": "f", "batch_size": "B", "ema_decay": "ema",
         "cancel_initial_noise": "nc0", "guidance_scale": "cfg", "t_star": "t*",
         "lr_schedule": "lr"}


def changed(config: dict) -> str:
    """The flags that differ from the old toy preset, in short form (LoRA targets as those added)."""
    flags = [f"{SHORT.get(k, k)}={config.get(k, v)}" for k, v in DEFAULTS.items() if config.get(k, v) != v]
    added = [m for m in config.get("target_modules", DEFAULT_TARGET_MODULES) if m not in DEFAULT_TARGET_MODULES]
    return ", ".join(flags + ([f"targets=+{'+'.join(added)}"] if added else []))


def main() -> None:
    rows = [(path.stem, json.loads(path.read_text())["emd"]) for path in SWEEP.glob("*.json")]
    rows.sort(key=lambda row: (row[0].rsplit("_", 1)[0], row[1]["config"]["iterations"]))
    minutes: dict[str, float] = {}  # a later stage resumed the earlier one: its minutes add up
    print("| point | changed from the old preset | iterations | prompts | all three | colour | shape | diversity | "
          "diversity 3 x 192 | Frechet | train min (total) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        acc, cfg = r["prompt_accuracy"], r["config"]
        point = name.rsplit("_", 1)[0]
        minutes[point] = minutes.get(point, 0.0) + r["train_minutes"]
        wide = f"{r['diversity']['mean']:.3f}" if r.get("diversity") else "-"
        print(f"| {name} | {changed(cfg)} | {cfg['iterations']} | {r.get('n', 240)} | {acc['all']:.3f} | "
              f"{acc['colour']:.3f} | {acc['shape']:.3f} | {r['diversity_ratio']['mean']:.2f} | {wide} | "
              f"{r['frechet_distance_to_real']:.1f} | {minutes[point]:.1f} |")


if __name__ == "__main__":
    main()
