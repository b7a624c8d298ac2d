"""`emd-t2i distill` (every DistillConfig field is a flag, shown with its default and each preset's value) and
`emd-t2i teachers`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from emd_t2i.cli.common import fail, literal_help, user_errors
from emd_t2i.training.config import PRESETS, DistillConfig, build_config, resolve_mixed_precision
from emd_t2i.training.presets import TABLES, chosen_preset

DISTILL_EXAMPLE = "Example: emd-t2i distill --teacher sd-1.5 --prompts general --output runs/sd15"

_FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def opt(name: str, panel: str):
    """A `--flag` for config field `name`, with the field's help text and default (None = preset or default)."""
    f = _FIELDS[name]
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}"] if f.type in ("bool", bool) else [flag]
    return typer.Option(*decls, help=literal_help(f"{f.metadata['help']} {default_text(name)}"), rich_help_panel=panel,
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


@user_errors
def distill(
    teacher: Annotated[str | None, opt("teacher", RUN)] = None,
    preset: Annotated[str | None, opt("preset", RUN)] = None,
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
    from emd_t2i.training.loop import distill as run_distill

    def export_at_end(run_dir: Path) -> None:  # on the main process, while the run folder is still locked
        from emd_t2i.export.writer import export_run

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
    """The preset the config stands on and the precision it will train in on this machine; then, for each preset
    value the run keeps, why it was chosen and where it was measured."""
    import torch  # only here: `emd-t2i --help` stays fast

    name = chosen_preset(cfg.preset, cfg.teacher)
    cuda = torch.cuda.is_available()
    device_type = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and cuda) else "cpu"
    precision = resolve_mixed_precision(cfg.mixed_precision, device_type, cuda and torch.cuda.is_bf16_supported())
    applied = f"preset: {name}" if name else "no preset: plain defaults"
    lines = [f"{applied}; mixed precision: {cfg.mixed_precision} -> {precision} on this machine ({device_type})"]
    for field, choice in TABLES.get(name, {}).items():
        if getattr(cfg, field) == choice.value:
            lines.append(f"  --{field.replace('_', '-')} {_shown(choice.value, _FIELDS[field].default)}: {choice.why} "
                         f"[{choice.measured}]")
    return "\n".join(lines)


def check_inputs(cfg: DistillConfig) -> None:
    """Cheap checks of what a run will read, so a mistake shows before any model is loaded."""
    from emd_t2i.models.teachers import resolve_teacher

    resolve_teacher(cfg.teacher)
    if cfg.prompts and not cfg.prompts.startswith("hf:"):
        from emd_t2i.data.prompts import load_prompts

        load_prompts(cfg.prompts, column=cfg.prompt_column, limit=1)
    if cfg.embeddings:
        from emd_t2i.data.store import read_manifest

        read_manifest(Path(cfg.embeddings))


@user_errors
def teachers():
    """List the teachers this tool knows by name (any local diffusers folder or hub id works too)."""
    from emd_t2i.models.teachers import teacher_table

    rows = teacher_table()
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    typer.echo("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        typer.echo("  ".join(str(r[k]).ljust(widths[k]) for k in keys))
    typer.echo(f"presets with tuned defaults: {', '.join(PRESETS)}")
