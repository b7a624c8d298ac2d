"""Score the EMA and the raw generator weights of finished runs on the toy teacher (docs/BENCHMARKS.md, "Sweep").

Training never reads the EMA, so a run's raw weights are exactly what the same run with `--ema-decay 0` exports.

    python benchmarks/ema_vs_raw.py runs/sweep/tstar800_lrg1e-3/emd runs/sweep/tstar800_lrg2e-3/emd
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from emd_t2i.evaluation.toy import one_step_images, toy_report
from emd_t2i.export.layout import FACTS_FILE
from emd_t2i.export.writer import export_run
from emd_t2i.training.config import EVAL_PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders whose latest checkpoint has an EMA")
    parser.add_argument("--n", type=int, default=EVAL_PROMPTS, help=f"evaluation prompts [default: {EVAL_PROMPTS}]")
    args = parser.parse_args()
    print("| run | weights | all three | diversity 1 x 64 | diversity 3 x 192 | Frechet to real |\n"
          "|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(args.runs):
            for raw in (False, True):
                export = export_run(run, Path(tmp) / f"{i}-{raw}", formats=("pipeline",), raw=raw)
                facts = json.loads((export / FACTS_FILE).read_text())
                r = toy_report(one_step_images(export), n=args.n)
                print(f"| {run} | {facts['generator_weights']} (step {facts['step']}) | "
                      f"{r['prompt_accuracy']['all']:.3f} | {r['diversity_ratio']['mean']:.2f} | "
                      f"{r['diversity']['mean']:.3f} | "
                      f"{r['frechet_distance_to_real']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
