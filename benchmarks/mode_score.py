"""Score a checkpoint of a toy run as `emd-t2i eval` does, with the study's sample sizes: the export of that
checkpoint (EMA weights, as `emd-t2i export --checkpoint STEP` writes it), full-prompt accuracy (960 prompts),
diversity, shape fidelity, and mode coverage on the six under-specified prompts with 768 samples each against the
25-step teacher at the run's guidance. The teacher's images depend only on (guidance, prompts, seed), so they are
made once and kept in runs/mode_score_cache for every student scored at that guidance.

    PYTHONPATH=. python benchmarks/mode_score.py runs/study22/dmd_s0 --step 1000 --out benchmarks/results/study22/dmd_s0_1000.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from emd_t2i.evaluation.toy import TOY_TEACHER_STEPS, one_step_images, teacher_images, toy_report
from emd_t2i.export.writer import export_run

CACHE = Path("runs/mode_score_cache")


def cached_teacher(guidance: float):
    """The 25-step teacher as an image source whose images are kept on disk, keyed by its inputs."""
    source = None

    def generate(prompts: list[str], seed: int) -> torch.Tensor:
        nonlocal source
        key = hashlib.sha256(json.dumps([guidance, TOY_TEACHER_STEPS, seed, prompts]).encode()).hexdigest()[:16]
        path = CACHE / f"teacher_{key}.pt"
        if path.exists():
            return torch.load(path)
        source = source or teacher_images(guidance)
        images = source(prompts, seed)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(images, path)
        return images

    return generate


def score(run: Path, step: int, coverage_samples: int = 768) -> dict:
    config = json.loads((run / "config.json").read_text())
    export = run / f"export-{step}"
    if not export.exists():
        export_run(run, output=export, formats=("lora", "pipeline"), checkpoint=step)
    start = time.time()
    report = toy_report(one_step_images(export), teacher=cached_teacher(config["guidance_scale"]),
                        coverage_samples=coverage_samples)
    shutil.rmtree(export)
    wall = run / "wall.txt"
    return {"run": str(run), "step": step, "one_step": report, "eval_seconds": round(time.time() - start),
            "distill_seconds": int(wall.read_text().split()[-1]) if wall.exists() else None, "config": config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--coverage-samples", type=int, default=768)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = score(args.run, args.step, args.coverage_samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    coverage = result["one_step"]["mode_coverage"]["mean"]
    print(f"{args.run} step {args.step}: accuracy {result['one_step']['prompt_accuracy']['all']:.3f} "
          f"TV {coverage['tv']:.3f} +- {coverage['tv_se']:.3f} (floor {coverage['tv_floor']:.3f}) "
          f"recall {coverage['modes_recalled']:.3f} entropy {coverage['entropy_ratio']:.3f}")


if __name__ == "__main__":
    main()
