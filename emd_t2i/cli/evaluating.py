"""`emd-t2i eval`: the COCO-2014 protocol (with --prompts) or the toy teacher's metrics (without)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from emd_t2i.cli.common import folder_flag, literal_help, user_errors
from emd_t2i.errors import UserError
from emd_t2i.training.config import EVAL_PROMPTS

EVAL_EXAMPLES = ("Examples: emd-t2i eval --model runs/toy/export (the toy metrics); emd-t2i eval --model "
                 "runs/sd15/export --prompts coco2014-val-30k --reference coco/val2014 --output evals/sd15 "
                 "(docs/EVALUATION.md)")

@user_errors
def evaluate(
    model: Annotated[str | None, typer.Option(help=literal_help("export or run folder, or a teacher (name, hub id, diffusers folder) [default: newest runs/*/export]"))] = None,
    prompts: Annotated[str | None, typer.Option(help="captions for the COCO protocol: coco2014-val-30k (the published list, see `emd-t2i coco captions`), a prepared list name or .json, or a prompt file; leave out for the toy metrics")] = None,
    reference: Annotated[str | None, typer.Option(help="COCO val2014 image folder (or zip), or a statistics .npz from `emd-t2i coco reference`")] = None,
    output: Annotated[Path | None, typer.Option(help="folder for images/ and metrics.json; the same command again resumes")] = None,
    n: Annotated[int | None, typer.Option(help=literal_help(f"toy: evaluation prompts [default: {EVAL_PROMPTS}]; COCO: only the first N captions [default: all]"))] = None,
    steps: Annotated[int | None, typer.Option(help=literal_help("teacher sampling steps [default: 50]"))] = None,
    guidance: Annotated[float | None, typer.Option(help=literal_help("teacher classifier-free guidance [default: 3]"))] = None,
    scheduler: Annotated[str, typer.Option(help="teacher sampler: teacher (its own scheduler) | ddim")] = "teacher",
    seed: Annotated[int, typer.Option(help="caption i gets seed SEED + i")] = 0,
    batch_size: Annotated[int, typer.Option(help="images per generation and feature batch")] = 8,
    device: Annotated[str | None, typer.Option(help=literal_help("auto | cpu | cuda | cuda:N [default: cpu for the toy, auto for COCO]"))] = None,
    clip_weights: Annotated[str | None, typer.Option(help=literal_help("open_clip ViT-g-14 laion2b_s12b_b42k weights file [default: the Hugging Face cache]"))] = None,
    inception_weights: Annotated[str | None, typer.Option(help=literal_help("clean-fid's inception-2015-12-05.pt [default: the emd-t2i cache or /tmp]"))] = None,
    speed_teacher_steps: Annotated[int, typer.Option(help="also time an export's teacher at N steps on the same hardware (0: off)")] = 50,
    protocol: Annotated[str, typer.Option(help="auto (dmd2-sdxl-coco10k for SDXL, else coco2014-30k-256) | coco2014-30k-256 | dmd2-sdxl-coco10k: FID resolution, patch FID, defaults below (docs/EVALUATION.md)")] = "auto",
    precision: Annotated[str, typer.Option(help="generation precision: auto (the protocol's: fp16 on CUDA as SiD-LSG, fp32 for SDXL as DMD2) | fp32 | fp16 | bf16")] = "auto",
    rounding: Annotated[str, typer.Option(help="8-bit pixels: auto (the protocol's) | round (SiD-LSG) | truncate (DMD2)")] = "auto",
):
    """Evaluate an export or a teacher: the COCO-2014 protocol (FID-30K, CLIP score, speed; writes metrics.json) with
    --prompts, or the toy teacher's metrics (prompt accuracy, diversity, Frechet distance; eval.json) without."""
    from emd_t2i.evaluation.coco import evaluate_coco
    from emd_t2i.evaluation.toy import evaluate_export

    if prompts is None:
        coco_only = {"--reference": reference, "--output": output, "--steps": steps, "--guidance": guidance,
                     "--clip-weights": clip_weights, "--inception-weights": inception_weights,
                     "--protocol": None if protocol == "auto" else protocol,
                     "--precision": None if precision == "auto" else precision,
                     "--rounding": None if rounding == "auto" else rounding}
        if given := [flag for flag, value in coco_only.items() if value is not None]:
            raise UserError(f"{', '.join(given)} belong to the COCO protocol: add --prompts coco2014-val-30k (or a "
                            "caption file)")
        if n is not None and n < 2:
            raise UserError("--n must be >= 2")
        typer.echo(json.dumps(evaluate_export(model, n=n or EVAL_PROMPTS, device=device or "cpu"), indent=2))
        return
    folder_flag("--output", output)
    metrics = evaluate_coco(model, prompts=prompts, reference=reference, output=output, n=n, steps=steps,
                            guidance=guidance, scheduler=scheduler, seed=seed, batch_size=batch_size,
                            device=device or "auto", clip_weights=clip_weights, inception_weights=inception_weights,
                            speed_teacher_steps=speed_teacher_steps, protocol=protocol, precision=precision,
                            rounding=rounding)
    if metrics is not None:  # None on the other processes of `accelerate launch`
        patch = f", patch FID {metrics['patch_fid']}" if "patch_fid" in metrics else ""
        typer.echo(f"FID {metrics['fid']}{patch}, CLIP score {metrics['clip_score']} ({metrics['images']['count']} "
                   f"images, protocol {metrics['protocol']['name']}, {metrics['precision']}, {metrics['rounding']}); "
                   f"all numbers and settings in {Path(output) / 'metrics.json'}")
