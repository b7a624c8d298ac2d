"""Recompute the mode coverage of finished mode-study runs with the current `toy.modes.coverage_report` (what
`emd-t2i eval` computes today), sampling the 25-step teacher once for all of them: the same numbers as re-running
`emd-t2i eval` on each export, in a fraction of the time. Rewrites one_step.mode_coverage in each result file.

    python benchmarks/mode_rescore.py benchmarks/results/mode_study/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from emd_t2i.evaluation.toy import one_step_images, teacher_images
from emd_t2i.toy.modes import coverage_report


def cached(source):
    images = {}

    def generate(batch, seed):
        key = (seed, tuple(batch))
        if key not in images:
            images[key] = source(batch, seed)
        return images[key]

    return generate


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    teachers = {}  # guidance -> the teacher as an image source that samples each (batch, seed) once
    for path in map(Path, paths):
        result = json.loads(path.read_text())
        guidance = result["config"]["guidance_scale"]
        if guidance not in teachers:
            teachers[guidance] = cached(teacher_images(guidance))
        export = Path(result["model"])
        result["one_step"]["mode_coverage"] = coverage_report(one_step_images(export), teachers[guidance])
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(path.name, round(result["one_step"]["mode_coverage"]["mean"]["tv"], 3), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
