"""Time per iteration of 2 processes (torchrun, CPU, gloo) against 1 process at the same global batch (issue 16).

    python benchmarks/scale_out.py --iterations 20 --global-batch 16 [--teacher toy]

Each process gets one thread (OMP_NUM_THREADS=1), so on a 2-core machine the two processes use both cores where
the single process uses one: the ratio shows what the explicit gradient all-reduce and the per-sample draws cost
against the work they split. Writes benchmarks/results/scale_out.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(processes: int, args, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(29600 + processes), "-m", "emd_t2i.cli", "distill", "--teacher", args.teacher,
               "--output", str(out), "--iterations", str(args.iterations), "--log-every", "1",
               "--batch-size", str(args.global_batch // processes), "--validate-every", "0",
               "--checkpoint-every", str(args.iterations), "--lr-schedule", "constant", "--no-export",
               "--device", "cpu"]
    start = time.monotonic()
    subprocess.run(command, env=env, check=True, capture_output=True)
    wall = time.monotonic() - start
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steady = log[len(log) // 4:]  # after warm-up
    s_per_it = sum(1 / r["it_per_s"] for r in steady) / len(steady)
    return {"processes": processes, "batch_per_process": args.global_batch // processes, "s_per_it": s_per_it,
            "wall_s": wall, "command": command}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--teacher", default="toy")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_out.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scale-out-"))
    rows = [run(p, args, work / f"p{p}") for p in (1, 2)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        print(f"| {r['processes']} process(es) x batch {r['batch_per_process']} | {r['s_per_it']:.3f} s/iteration |")
    print(f"speed-up of 2 processes: {rows[0]['s_per_it'] / rows[1]['s_per_it']:.2f}x")


if __name__ == "__main__":
    main()
