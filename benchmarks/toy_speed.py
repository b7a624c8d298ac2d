"""Seconds per iteration of the toy preset, as `emd-t2i distill --teacher toy` runs it (docs/BENCHMARKS.md).

Trains `--iterations` steps of the preset in a temporary folder, logging every step, and reports the median
seconds per iteration after the first `--warmup` steps. Thread settings are read by torch and OpenMP at
start-up, so set them in the environment of each run:

    python benchmarks/toy_speed.py                                      # the quickstart's own setting
    OMP_NUM_THREADS=1 python benchmarks/toy_speed.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/toy_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
from toy_quality import parse_sets  # benchmarks/ is on sys.path when this script runs

from emd_t2i.training.config import build_config
from emd_t2i.training.loop import distill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first iterations left out")
    parser.add_argument("--set", action="append", default=[], help="override a distill flag: KEY=VALUE (JSON value)")
    args = parser.parse_args()
    overrides = parse_sets(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(teacher="toy", output=str(Path(tmp) / "run"), iterations=args.iterations,
                           log_every=1, validate_every=0, checkpoint_every=args.iterations, **overrides)
        distill(cfg)
        lines = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "it_per_s" in line and line["step"] > args.warmup]
    env = {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    s_per_it = statistics.median(1 / line["it_per_s"] for line in steps)
    print(json.dumps({"torch_threads": torch.get_num_threads(), **env, "s_per_it": round(s_per_it, 3),
                      "unet_rows_per_it": steps[-1]["unet_rows_per_it"], "overrides": overrides}))


if __name__ == "__main__":
    main()
