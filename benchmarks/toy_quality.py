"""The toy-teacher quality table of docs/BENCHMARKS.md: teacher (25, 50, 1 step), EMD student, DMD baseline.

Every row is measured by emd_t2i.evaluate.toy_report on the same prompts and seeds. The students are trained
by the same code (`emd_t2i.train.distill`); the DMD baseline is EMD with K = 1, gamma_eps = 2, gamma_z = 0
(docs/ALGORITHM.md: that is exactly DMD's distribution-matching gradient).

    python benchmarks/toy_quality.py --out benchmarks/results/toy_quality.json   # 960 prompts per row
    python benchmarks/toy_quality.py --rows emd dmd --iterations 900   # longer students (resumes the 300 runs)
    python benchmarks/toy_quality.py --rows emd --set num_langevin_steps=4 --set gamma_eps=0.8   # a sweep point
    python benchmarks/toy_quality.py --rows teacher1 emd dmd --keep --out X.json   # keep X.json's other rows
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from emd_t2i.evaluation.toy import one_step_images, toy_report
from emd_t2i.export.writer import export_run, one_step_scheduler
from emd_t2i.models.teachers import TOY_TEACHER_DIR
from emd_t2i.toy import metrics
from emd_t2i.training.config import EVAL_PROMPTS, build_config
from emd_t2i.training.loop import distill

# The teacher rows are the reference of issue 5's bar: sampled with guidance 3 in every table so far, whatever
# guidance the students distill with (for them a distillation knob; `--guidance` gives teacher rows at another w).
TEACHER_GUIDANCE = 3.0
DMD = {"num_langevin_steps": 1, "gamma_eps": 2.0, "gamma_z": 0.0, "noise_cancellation": True}


def teacher_source(steps: int, guidance: float, t_star: int):
    pipe = metrics.load_pipeline(TOY_TEACHER_DIR)
    if steps == 1:  # the teacher's own one-step x0-prediction at t* (G1 with the teacher's weights: the student's start)
        pipe.scheduler = one_step_scheduler(dict(pipe.scheduler.config), t_star, "epsilon")
    return lambda prompts, seed: metrics.sample_teacher(pipe, prompts, steps, guidance, seed)


def student_source(name: str, overrides: dict, runs: Path):
    cfg = build_config(teacher="toy", output=str(runs / name), **overrides)
    start = time.time()
    run_dir = distill(cfg)
    minutes = (time.time() - start) / 60
    export = export_run(run_dir, formats=("pipeline",), overwrite=True)
    return one_step_images(export), minutes, cfg


def parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        out[key] = json.loads(value) if value not in ("true", "false") else value == "true"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=EVAL_PROMPTS, help=f"evaluation prompts [default: {EVAL_PROMPTS}]")
    parser.add_argument("--guidance", type=float, default=None, help=f"teacher guidance [default: {TEACHER_GUIDANCE}]")
    parser.add_argument("--rows", nargs="+", default=["teacher25", "teacher50", "teacher1", "emd", "dmd"])
    parser.add_argument("--set", action="append", default=[], help="override a distill flag of the EMD row: KEY=VALUE")
    parser.add_argument("--iterations", type=int, default=None, help="iterations of both students [default: preset]")
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the rows of --out that --rows does not recompute")
    args = parser.parse_args()
    preset = build_config(teacher="toy")
    guidance = args.guidance or TEACHER_GUIDANCE
    emd_overrides = parse_sets(args.set)

    results = json.loads(args.out.read_text()) if args.keep and args.out and args.out.exists() else {}
    for row in args.rows:
        start = time.time()
        if row.startswith("teacher"):
            steps = int(row[len("teacher"):])
            source = teacher_source(steps, guidance, preset.t_star)
            extra = {"guidance_scale": guidance, **({"t_star": preset.t_star} if steps == 1 else {})}
        else:
            overrides = DMD if row == "dmd" else emd_overrides
            if args.iterations:  # a longer run on the same folder resumes the shorter one
                overrides = {**overrides, "iterations": args.iterations}
            source, minutes, cfg = student_source(row, overrides, args.runs)
            extra = {"train_minutes": round(minutes, 1), "config": {k: v for k, v in cfg.to_dict().items()
                                                                      if k not in ("output", "prompts")}}
        report = toy_report(source, n=args.n)
        results[row] = {**report, **extra, "eval_seconds": round(time.time() - start, 1)}
        print(json.dumps({row: results[row]}), flush=True)

    print("\n| source | colour | shape | background | all three | diversity 1 x 64 | diversity 3 x 192 | "
          "Frechet to real |")
    print("|---|---|---|---|---|---|---|---|")
    for row, r in results.items():
        acc, wide = r["prompt_accuracy"], (r.get("diversity") or {}).get("mean", float("nan"))
        print(f"| {row} | {acc['colour']:.3f} | {acc['shape']:.3f} | {acc['background']:.3f} | {acc['all']:.3f} "
              f"| {r['diversity_ratio']['mean']:.2f} | {wide:.3f} | {r['frechet_distance_to_real']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
