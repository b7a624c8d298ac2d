"""`emd-t2i export` (a run's generator in every client's format) and `emd-t2i sample` (one UNet call per image)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emd_t2i.cli.common import folder_flag, user_errors
from emd_t2i.errors import UserError

EXPORT_EXAMPLE = "Example: emd-t2i export runs/sd15 --format lora --format kohya"
SAMPLE_EXAMPLE = 'Example: emd-t2i sample "a cat" --model runs/sd15/export --num-images 4 --teacher-steps 25'

@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run folder made by `emd-t2i distill`")],
    output: Annotated[Path | None, typer.Option(help="export folder [default: RUN_DIR/export]")] = None,
    format: Annotated[list[str] | None, typer.Option("--format", help="lora | pipeline | kohya | all (repeatable)")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="step number or checkpoint folder [default: latest]")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing export folder")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="the raw generator weights, not their EMA")] = False,
):
    """Export a run: diffusers LoRA, a one-step diffusers pipeline folder, a kohya LoRA, and a model card."""
    from emd_t2i.export.writer import FORMATS, export_run

    folder_flag("--output", output)
    formats = tuple(FORMATS) if not format or "all" in format else tuple(format)
    step = int(checkpoint) if checkpoint and checkpoint.isdigit() else checkpoint
    path = export_run(run_dir, output=output, formats=formats, overwrite=overwrite, checkpoint=step, raw=raw)
    typer.echo(f"exported to {path}")


@user_errors
def sample(
    prompt: Annotated[list[str] | None, typer.Argument(help="one or more prompts")] = None,
    prompts: Annotated[str | None, typer.Option("--prompts", help="a prompt file or bundled list instead")] = None,
    model: Annotated[str | None, typer.Option(help="export folder or run folder [default: newest runs/*/export]")] = None,
    seed: Annotated[int, typer.Option(help="seed of the first image; the same seed gives the same image in diffusers")] = 0,
    num_images: Annotated[int, typer.Option(help="images per prompt")] = 1,
    teacher_steps: Annotated[int, typer.Option(help="also render the teacher with N steps, side by side (0: off)")] = 0,
    guidance_scale: Annotated[float | None, typer.Option(help="teacher guidance for --teacher-steps [default: the run's]")] = None,
    batch_size: Annotated[int, typer.Option(help="images per UNet call")] = 8,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    output: Annotated[Path, typer.Option("--output", help="folder for the PNGs")] = Path("samples"),
):
    """Generate images with a distilled model: one UNet call per image."""
    from emd_t2i.export.sample import sample as run_sample
    from emd_t2i.export.sample import save_samples

    folder_flag("--output", output)

    if prompts:
        from emd_t2i.data.prompts import load_prompts

        prompt = (prompt or []) + load_prompts(prompts)
    if not prompt:
        raise UserError("give a prompt (emd-t2i sample \"a cat\") or --prompts FILE")
    if num_images < 1 or batch_size < 1 or teacher_steps < 0:
        raise UserError("--num-images and --batch-size must be >= 1, --teacher-steps >= 0")
    samples = run_sample(prompt, model, seed=seed, num_images=num_images, device=device, teacher_steps=teacher_steps,
                         guidance_scale=guidance_scale, batch_size=batch_size)
    for path in save_samples(samples, output):
        typer.echo(f"wrote {path}")
