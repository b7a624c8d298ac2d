"""Soak: a long toy run while its resident memory (RSS) is sampled, to show it stays flat (issue 16).

Runs `emd-t2i distill --teacher toy` in a subprocess for --iterations, samples the child's RSS from /proc every
--interval seconds, and reads log.jsonl to place the samples at iterations. Writes a JSON with the trace and a
summary (RSS at 10%, 50% and 100% of the run; growth over the second half), and prints a markdown line.

    python benchmarks/soak.py --iterations 500 --out benchmarks/results/soak.json [-- extra distill flags]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process (VmRSS), MiB; None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def logged_step(log: Path) -> int:
    try:
        lines = log.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args, extra = parser.parse_known_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    run_dir = workdir / "run"
    command = [sys.executable, "-m", "emd_t2i.cli", "distill", "--teacher", "toy", "--output", str(run_dir),
               "--iterations", str(args.iterations), "--log-every", "1", "--lr-schedule", "constant",
               "--validate-every", "100", "--checkpoint-every", "100", "--no-export", *[e for e in extra if e != "--"]]
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trace = []
    while proc.poll() is None:
        rss = rss_mib(proc.pid)
        if rss is not None:
            trace.append({"s": round(time.monotonic() - start, 1), "step": logged_step(run_dir / "log.jsonl"),
                          "rss_mib": round(rss, 1)})
        time.sleep(args.interval)
    if proc.returncode != 0:
        sys.exit(f"the run failed (exit {proc.returncode}): {' '.join(command)}")

    def at(fraction: float) -> float:
        step = fraction * args.iterations
        return next((t["rss_mib"] for t in trace if t["step"] >= step), trace[-1]["rss_mib"])

    second_half = [t["rss_mib"] for t in trace if t["step"] >= args.iterations / 2]
    summary = {"iterations": args.iterations, "seconds": round(time.monotonic() - start, 1),
               "rss_mib_at_10pct": at(0.1), "rss_mib_at_50pct": at(0.5), "rss_mib_at_end": at(1.0),
               "rss_mib_max": max(t["rss_mib"] for t in trace),
               "growth_mib_second_half": round(max(second_half) - min(second_half), 1), "command": command}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "trace": trace}, indent=1) + "\n")
    print(f"| {args.iterations} iterations, {summary['seconds']:.0f} s | RSS at 10% / 50% / end: "
          f"{summary['rss_mib_at_10pct']:.0f} / {summary['rss_mib_at_50pct']:.0f} / {summary['rss_mib_at_end']:.0f} "
          f"MiB | growth over the second half: {summary['growth_mib_second_half']:.1f} MiB |")


if __name__ == "__main__":
    main()
