"""The `emd-t2i` command line: a thin Typer shell over the library's functions."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli_common import _literal, fail, folder_flag, user_errors
from .cli_data import coco_app, prompts_app
from .config import EVAL_PROMPTS, PRESETS, DistillConfig, build_config, resolve_mixed_precision
from .errors import UserError
from .presets import preset_name

app = typer.Typer(
    help="Distill a Stable Diffusion teacher into a one-step generator with EM Distillation (EMD).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
toy_app = typer.Typer(help="The embedded toy teacher: train it, inspect its domain.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
app.add_typer(prompts_app, name="prompts")
app.add_typer(coco_app, name="coco")


# ---------------------------------------------------------------- distill
_FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def opt(name: str, panel: str):
    """A `--flag` for config field `name`, with the field's help text and default (None = preset or default)."""
    f = _FIELDS[name]
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}"] if f.type in ("bool", bool) else [flag]
    return typer.Option(*decls, help=_literal(f"{f.metadata['help']} {default_text(name)}"), rich_help_panel=panel,
                        show_default=False)


def default_text(name: str) -> str:
    """'[default: 999; presets: toy 800, sd-1.5 800]': the value a run will use, by teacher."""
    default = _FIELDS[name].default
    presets = [f"{p} {_shown(values[name], default)}" for p, values in PRESETS.items() if name in values]
    return f"[default: {_shown(default, default)}" + (f"; presets: {', '.join(presets)}]" if presets else "]")


def _shown(value, default) -> str:
    """A flag value as typed; LoRA targets that extend the default list show only what they add."""
    if not isinstance(value, tuple):
        return str(value)
    if value != default and value[: len(default)] == default:
        return "+" + "+".join(value[len(default):])
    return ",".join(value)


RUN, EMD, OPTIM, WATCH = "Run", "EMD (docs/ALGORITHM.md)", "Optimisation", "Watching and saving"


@app.command(epilog="Example: emd-t2i distill --teacher sd-1.5 --prompts general --output runs/sd15")
@user_errors
def distill(
    teacher: Annotated[str | None, opt("teacher", RUN)] = None,
    prompts: Annotated[str | None, opt("prompts", RUN)] = None,
    output: Annotated[str | None, opt("output", RUN)] = None,
    prompt_column: Annotated[str | None, opt("prompt_column", RUN)] = None,
    embeddings: Annotated[str | None, opt("embeddings", RUN)] = None,
    embedding_cache: Annotated[int | None, opt("embedding_cache", RUN)] = None,
    num_langevin_steps: Annotated[int | None, opt("num_langevin_steps", EMD)] = None,
    gamma_eps: Annotated[float | None, opt("gamma_eps", EMD)] = None,
    gamma_z: Annotated[float | None, opt("gamma_z", EMD)] = None,
    z_step: Annotated[str | None, opt("z_step", EMD)] = None,
    jacobian_every: Annotated[int | None, opt("jacobian_every", EMD)] = None,
    noise_cancellation: Annotated[bool | None, opt("noise_cancellation", EMD)] = None,
    cancel_initial_noise: Annotated[bool | None, opt("cancel_initial_noise", EMD)] = None,
    t_star: Annotated[int | None, opt("t_star", EMD)] = None,
    t_min: Annotated[int | None, opt("t_min", EMD)] = None,
    t_max: Annotated[int | None, opt("t_max", EMD)] = None,
    guidance_scale: Annotated[float | None, opt("guidance_scale", EMD)] = None,
    weighting: Annotated[str | None, opt("weighting", EMD)] = None,
    fake_updates: Annotated[int | None, opt("fake_updates", EMD)] = None,
    iterations: Annotated[int | None, opt("iterations", OPTIM)] = None,
    batch_size: Annotated[int | None, opt("batch_size", OPTIM)] = None,
    generator_lr: Annotated[float | None, opt("generator_lr", OPTIM)] = None,
    fake_lr: Annotated[float | None, opt("fake_lr", OPTIM)] = None,
    lr_schedule: Annotated[str | None, opt("lr_schedule", OPTIM)] = None,
    lr_warmup: Annotated[int | None, opt("lr_warmup", OPTIM)] = None,
    generator_rank: Annotated[int | None, opt("generator_rank", OPTIM)] = None,
    fake_rank: Annotated[int | None, opt("fake_rank", OPTIM)] = None,
    target_modules: Annotated[str | None, opt("target_modules", OPTIM)] = None,
    max_grad_norm: Annotated[float | None, opt("max_grad_norm", OPTIM)] = None,
    ema_decay: Annotated[float | None, opt("ema_decay", OPTIM)] = None,
    grad_accum: Annotated[int | None, opt("grad_accum", OPTIM)] = None,
    mixed_precision: Annotated[str | None, opt("mixed_precision", OPTIM)] = None,
    gradient_checkpointing: Annotated[bool | None, opt("gradient_checkpointing", OPTIM)] = None,
    seed: Annotated[int | None, opt("seed", OPTIM)] = None,
    log_every: Annotated[int | None, opt("log_every", WATCH)] = None,
    validate_every: Annotated[int | None, opt("validate_every", WATCH)] = None,
    num_validation_prompts: Annotated[int | None, opt("num_validation_prompts", WATCH)] = None,
    checkpoint_every: Annotated[int | None, opt("checkpoint_every", WATCH)] = None,
    keep_checkpoints: Annotated[int | None, opt("keep_checkpoints", WATCH)] = None,
    report_to: Annotated[str | None, opt("report_to", WATCH)] = None,
    device: Annotated[str | None, opt("device", WATCH)] = None,
    profile: Annotated[bool | None, opt("profile", WATCH)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the resolved config and check inputs; train nothing")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start over: a run already in --output is moved aside (never deleted)")] = False,
    no_export: Annotated[bool, typer.Option("--no-export", help="do not export at the end")] = False,
):
    """Distill a teacher into a one-step generator. Running the same command again resumes."""
    given = {k: v for k, v in locals().items() if k in _FIELDS}
    if target_modules is not None:
        given["target_modules"] = tuple(m.strip() for m in target_modules.split(",") if m.strip())
    cfg = build_config(**given)
    check_inputs(cfg)
    if dry_run:
        typer.echo(json.dumps(cfg.to_dict(), indent=2))
        typer.echo(dry_run_summary(cfg))
        return
    from .train import distill as run_distill

    def export_at_end(run_dir: Path) -> None:  # on the main process, while the run folder is still locked
        from .export import export_run

        typer.echo(f"exported to {export_run(run_dir, overwrite=True)}")

    try:
        run_dir = run_distill(cfg, overwrite=overwrite, finish=None if no_export else export_at_end)
    except KeyboardInterrupt as err:  # Interrupted (saved, between iterations) or a second Ctrl-C (not saved)
        raise typer.Exit(getattr(err, "exit_code", 130)) from None
    except FloatingPointError as err:  # persistent NaN/inf: the run saved a checkpoint and stopped cleanly
        raise fail(str(err), code=1) from None
    from accelerate import PartialState

    if PartialState().is_main_process:  # one report: the other processes are done
        typer.echo(f"run folder: {run_dir}")


def dry_run_summary(cfg: DistillConfig) -> str:
    """One line: the preset the config stands on, and the precision it will train in on this machine."""
    import torch  # only here: `emd-t2i --help` stays fast

    name = preset_name(cfg.teacher)
    cuda = torch.cuda.is_available()
    device_type = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and cuda) else "cpu"
    precision = resolve_mixed_precision(cfg.mixed_precision, device_type, cuda and torch.cuda.is_bf16_supported())
    applied = f"preset: {name}" if name else "no preset: plain defaults"
    return f"{applied}; mixed precision: {cfg.mixed_precision} -> {precision} on this machine ({device_type})"


def check_inputs(cfg: DistillConfig) -> None:
    """Cheap checks of what a run will read, so a mistake shows before any model is loaded."""
    from .teachers import resolve_teacher

    resolve_teacher(cfg.teacher)
    if cfg.prompts and not cfg.prompts.startswith("hf:"):
        from .prompts import load_prompts

        load_prompts(cfg.prompts, column=cfg.prompt_column, limit=1)
    if cfg.embeddings:
        from .embedding_store import read_manifest

        read_manifest(Path(cfg.embeddings))


# ---------------------------------------------------------------- teachers, toy
@app.command()
@user_errors
def teachers():
    """List the teachers this tool knows by name (any local diffusers folder or hub id works too)."""
    from .teachers import teacher_table

    rows = teacher_table()
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    typer.echo("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        typer.echo("  ".join(str(r[k]).ljust(widths[k]) for k in keys))
    typer.echo(f"presets with tuned defaults: {', '.join(PRESETS)}")


@toy_app.command("train-teacher")
@user_errors
def toy_train_teacher(
    output: Annotated[Path, typer.Option(help="pipeline folder to write (replaced atomically)")] = Path("runs/toy-teacher"),
    checkpoints: Annotated[Path, typer.Option(help="resumable training state")] = Path("runs/toy-teacher-ckpt"),
    unet_steps: Annotated[int | None, typer.Option(help="diffusion-model steps [default: the recipe's]")] = None,
    vae_steps: Annotated[int | None, typer.Option(help="autoencoder steps [default: the recipe's]")] = None,
    num_images: Annotated[int | None, typer.Option(help="size of the fixed training set [default: the recipe's]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="diffusion-model batch [default: the recipe's]")] = None,
    attribute_dropout: Annotated[float | None, typer.Option(help="chance a caption leaves out each attribute "
                                                            "[default: the recipe's]")] = None,
    init_from: Annotated[Path | None, typer.Option(help="a toy teacher folder to fine-tune (keeps its VAE)")] = None,
    export_only: Annotated[bool, typer.Option("--export-only", help="only re-export from the last checkpoint")] = False,
):
    """Train the toy teacher with the project's recipe (resumable: run the same command again to continue)."""
    from dataclasses import replace

    from .toy.train_teacher import TeacherRecipe, train_teacher

    folder_flag("--output", output)
    folder_flag("--checkpoints", checkpoints)
    given = {"unet_steps": unet_steps, "vae_steps": vae_steps, "num_images": num_images, "batch_size": batch_size}
    if any(v is not None and v < 1 for v in given.values()):
        raise UserError("--unet-steps, --vae-steps, --num-images and --batch-size must be >= 1")
    if attribute_dropout is not None and not 0 <= attribute_dropout <= 1:
        raise UserError("--attribute-dropout must be between 0 and 1")
    if init_from is not None and not (init_from / "unet").is_dir():
        raise UserError(f"--init-from {init_from} is not a toy teacher folder (no unet/ in it)")
    given.update(attribute_dropout=attribute_dropout, init_from=None if init_from is None else str(init_from))
    recipe = replace(TeacherRecipe(), **{k: v for k, v in given.items() if v is not None})
    path = train_teacher(output, checkpoints, recipe, export_only=export_only)
    typer.echo(f"toy teacher saved to {path}; use it with --teacher {path}")


# ---------------------------------------------------------------- prompts
@app.command(epilog="Example: emd-t2i export runs/sd15 --format lora --format kohya")
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
    from .export import FORMATS, export_run

    folder_flag("--output", output)
    formats = tuple(FORMATS) if not format or "all" in format else tuple(format)
    step = int(checkpoint) if checkpoint and checkpoint.isdigit() else checkpoint
    path = export_run(run_dir, output=output, formats=formats, overwrite=overwrite, checkpoint=step, raw=raw)
    typer.echo(f"exported to {path}")


@app.command(epilog='Example: emd-t2i sample "a cat" --model runs/sd15/export --num-images 4 --teacher-steps 25')
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
    from .sample import sample as run_sample
    from .sample import save_samples

    folder_flag("--output", output)

    if prompts:
        from .prompts import load_prompts

        prompt = (prompt or []) + load_prompts(prompts)
    if not prompt:
        raise UserError("give a prompt (emd-t2i sample \"a cat\") or --prompts FILE")
    if num_images < 1 or batch_size < 1 or teacher_steps < 0:
        raise UserError("--num-images and --batch-size must be >= 1, --teacher-steps >= 0")
    samples = run_sample(prompt, model, seed=seed, num_images=num_images, device=device, teacher_steps=teacher_steps,
                         guidance_scale=guidance_scale, batch_size=batch_size)
    for path in save_samples(samples, output):
        typer.echo(f"wrote {path}")


@app.command("eval", epilog="Examples: emd-t2i eval --model runs/toy/export (the toy metrics); emd-t2i eval --model "
             "runs/sd15/export --prompts coco2014-val-30k --reference coco/val2014 --output evals/sd15 (docs/EVALUATION.md)")
@user_errors
def evaluate(
    model: Annotated[str | None, typer.Option(help=_literal("export or run folder, or a teacher (name, hub id, diffusers folder) [default: newest runs/*/export]"))] = None,
    prompts: Annotated[str | None, typer.Option(help="captions for the COCO protocol: coco2014-val-30k (the published list, see `emd-t2i coco captions`), a prepared list name or .json, or a prompt file; leave out for the toy metrics")] = None,
    reference: Annotated[str | None, typer.Option(help="COCO val2014 image folder (or zip), or a statistics .npz from `emd-t2i coco reference`")] = None,
    output: Annotated[Path | None, typer.Option(help="folder for images/ and metrics.json; the same command again resumes")] = None,
    n: Annotated[int | None, typer.Option(help=_literal(f"toy: evaluation prompts [default: {EVAL_PROMPTS}]; COCO: only the first N captions [default: all]"))] = None,
    steps: Annotated[int | None, typer.Option(help=_literal("teacher sampling steps [default: 50]"))] = None,
    guidance: Annotated[float | None, typer.Option(help=_literal("teacher classifier-free guidance [default: 3]"))] = None,
    scheduler: Annotated[str, typer.Option(help="teacher sampler: teacher (its own scheduler) | ddim")] = "teacher",
    seed: Annotated[int, typer.Option(help="caption i gets seed SEED + i")] = 0,
    batch_size: Annotated[int, typer.Option(help="images per generation and feature batch")] = 8,
    device: Annotated[str | None, typer.Option(help=_literal("auto | cpu | cuda | cuda:N [default: cpu for the toy, auto for COCO]"))] = None,
    clip_weights: Annotated[str | None, typer.Option(help=_literal("open_clip ViT-g-14 laion2b_s12b_b42k weights file [default: the Hugging Face cache]"))] = None,
    inception_weights: Annotated[str | None, typer.Option(help=_literal("clean-fid's inception-2015-12-05.pt [default: the emd-t2i cache or /tmp]"))] = None,
    speed_teacher_steps: Annotated[int, typer.Option(help="also time an export's teacher at N steps on the same hardware (0: off)")] = 50,
    protocol: Annotated[str, typer.Option(help="auto (dmd2-sdxl-coco10k for SDXL, else coco2014-30k-256) | coco2014-30k-256 | dmd2-sdxl-coco10k: FID resolution, patch FID, defaults below (docs/EVALUATION.md)")] = "auto",
    precision: Annotated[str, typer.Option(help="generation precision: auto (the protocol's: fp16 on CUDA as SiD-LSG, fp32 for SDXL as DMD2) | fp32 | fp16 | bf16")] = "auto",
    rounding: Annotated[str, typer.Option(help="8-bit pixels: auto (the protocol's) | round (SiD-LSG) | truncate (DMD2)")] = "auto",
):
    """Evaluate an export or a teacher: the COCO-2014 protocol (FID-30K, CLIP score, speed; writes metrics.json) with
    --prompts, or the toy teacher's metrics (prompt accuracy, diversity, Frechet distance; eval.json) without."""
    from .evaluate import evaluate_coco, evaluate_export

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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
