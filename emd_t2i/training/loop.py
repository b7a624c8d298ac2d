"""The distillation run: one flat EMD loop on accelerate, with logs, sample grids, checkpoints and resume."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from emd_t2i.data.embeddings import open_embeddings
from emd_t2i.data.prompts import distinct_spread, open_prompts, truncate_report
from emd_t2i.errors import UserError
from emd_t2i.models.teachers import load_teacher
from emd_t2i.training import checkpoint as ckpt
from emd_t2i.training.batch import make_batch
from emd_t2i.training.config import DistillConfig
from emd_t2i.training.distributed import agreed, check_ranks_agree, make_accelerator
from emd_t2i.training.grids import validation_grid
from emd_t2i.training.interrupt import Interrupted, StopRequest
from emd_t2i.training.run import FakeStats, GeneratorStats, Run, mixed_precision_on, weight_dtype
from emd_t2i.training.run_folder import append_jsonl, claim_run_dir, record_config
from emd_t2i.training.telemetry import UNetClock, Window, global_means

MAX_BAD_STEPS = 10  # consecutive non-finite losses before the run stops (after saving)


def distill(cfg: DistillConfig, overwrite: bool = False, stop_after: int | None = None,
            finish: Callable[[Path], None] | None = None) -> Path:
    """Run (or resume) EMD distillation. `stop_after` ends early after that many iterations in this call
    (checkpointing first), as a crash would; running again continues. SIGINT / SIGTERM finish the iteration
    in progress, save it, and raise `Interrupted`. `finish` (the CLI's export) runs on the main process after the
    last iteration, while the run folder is still locked: a second command on the folder cannot export beside it."""
    run_dir = Path(cfg.output)
    accelerator = make_accelerator(cfg, run_dir)
    lock = ckpt.RunLock(run_dir)
    try:
        try:
            agreed(accelerator, claim_run_dir, cfg, overwrite, accelerator.num_processes, lock, main_only=True)
            _distill(cfg, accelerator, stop_after)
        finally:  # trackers closed, process group ended (gloo's threads abort a process that exits with them)
            accelerator.end_training()
        if finish is not None and accelerator.is_main_process:
            finish(run_dir)
    finally:
        lock.release()
    return run_dir


@dataclass
class Inputs:
    """What a run reads: the teacher, its prompts and their embeddings."""

    teacher: object
    prompts: object
    cache: object
    validation_prompts: list[str]


def open_inputs(cfg: DistillConfig, device: torch.device, precision: str) -> Inputs:
    """The teacher, the prompts (read lazily: 8 bytes each in RAM) and their embeddings (a precomputed store or a
    bounded cache, each encoded once), and the null prompt for guidance."""
    if not cfg.prompts:
        raise UserError("--prompts is required for this teacher (a .txt/.jsonl/.csv file, a folder, or hf:NAME)")
    teacher = load_teacher(cfg.teacher, dtype=weight_dtype(precision), device=device)
    prompts = open_prompts(cfg.prompts, column=cfg.prompt_column)
    truncate_report(teacher.tokenizer, prompts)
    cache = open_embeddings(teacher.tokenizer, teacher.conditioning_encoder(), prompts, cfg.embeddings,
                            max_entries=cfg.embedding_cache)
    return Inputs(teacher, prompts, cache, distinct_spread(prompts, cfg.num_validation_prompts))


def log_record(g: GeneratorStats, f: FakeStats, lr_scale: float, jacobian_norm: float | None) -> dict:
    """One iteration's numbers as log.jsonl and the trackers show them."""
    return {"loss_generator": g.loss, "loss_fake": f.loss, "weight": g.weight, "eps_tilde_rms": g.eps_tilde_rms,
            "lr_scale": lr_scale, "jacobian_norm": jacobian_norm, "grad_norm_generator": g.grad_norm,
            "grad_norm_fake": f.grad_norm}


def finite_iteration(stats: dict, fp16: bool) -> bool:
    """Whether an iteration was sound. Under fp16 an overflowing gradient is the loss scaler's business (it
    skips the step and backs off), so only the losses themselves count."""
    keys = ("loss_generator", "loss_fake") if fp16 else ("grad_norm_generator", "grad_norm_fake")
    return all(math.isfinite(stats[k]) for k in keys)


def log_line(accelerator, path: Path, stats: dict) -> None:
    append_jsonl(path, stats)
    accelerator.log({k: v for k, v in stats.items() if k != "step"}, step=stats["step"])


def _distill(cfg: DistillConfig, accelerator, stop_after: int | None) -> None:
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    run_dir, main = Path(cfg.output), accelerator.is_main_process
    precision = mixed_precision_on(device, cfg.mixed_precision)
    if device.type == "cuda":  # TF32 for the float32 work (LoRA matmuls, the EMD math); bf16/fp16 is unaffected
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)

    inputs = agreed(accelerator, open_inputs, cfg, device, precision)
    teacher, prompts, cache = inputs.teacher, inputs.prompts, inputs.cache
    agreed(accelerator, record_config, cfg, world, main_only=True)  # the inputs are sound: this is the run
    clock = UNetClock(device) if cfg.profile else None
    run = Run.start(cfg, teacher, device, precision, world, clock)

    def on_main(fn, *args):  # the main process writes the run folder; a failed write stops every process
        return agreed(accelerator, fn, *args, main_only=True)

    check_ranks_agree(teacher.unet, accelerator, "at start")
    run.resume(accelerator)
    if run.step > 0:
        check_ranks_agree(teacher.unet, accelerator, f"after resuming at iteration {run.step}")
    if main and cfg.report_to != "none":
        accelerator.init_trackers("emd-t2i", config={k: str(v) for k, v in cfg.to_dict().items()})
    latent_shape = (teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    last_step = cfg.iterations if stop_after is None else min(cfg.iterations, run.step + stop_after)
    bar = tqdm(total=cfg.iterations, initial=run.step, disable=not main, desc="emd")
    window = Window.start(run, clock)
    try:
        with StopRequest() as stop:
            while run.step < last_step:
                # ---- one iteration: E-step and M-step, the EMA, the fake-score updates
                lr_scale = run.set_learning_rates()
                batch = agreed(accelerator, make_batch, cfg, run.settings, prompts, cache, latent_shape, run.step,
                               rank, world, device)
                if run.settings.z_step == "jacobian" and (run.step % cfg.jacobian_every == 0
                                                          or run.jacobian_norm is None):
                    run.jacobian_norm = agreed(accelerator, run.measure_jacobian_norm, prompts, cache, latent_shape)
                g, x0_samples = run.generator_update(batch)
                run.update_ema()
                f = run.fake_score_updates(batch, x0_samples)
                stats = log_record(g, f, lr_scale, run.jacobian_norm)
                global_means(stats, world, device)

                # ---- no NaN is hidden: non-finite steps were skipped above; count them, stop when they persist
                if not finite_iteration(stats, precision == "fp16"):
                    run.bad_steps += 1
                    if run.bad_steps >= MAX_BAD_STEPS:
                        on_main(run.save)
                        raise FloatingPointError(
                            f"{MAX_BAD_STEPS} non-finite losses in a row at iteration {run.step}; lower the "
                            "learning rates or use bf16 instead of fp16")
                else:
                    run.bad_steps = 0
                run.step += 1
                bar.update(1)

                # ---- watch: logs, grids, checkpoints
                if run.step % cfg.log_every == 0 or run.step == last_step:
                    stats.update(step=run.step, non_finite=run.bad_steps, **window.read(run, clock, device))
                    if precision == "fp16":
                        stats.update(loss_scale_generator=run.scaler_generator.get_scale(),
                                     loss_scale_fake=run.scaler_fake.get_scale())
                    window = Window.start(run, clock)
                    bar.set_postfix(g=f"{stats['loss_generator']:.4f}", f=f"{stats['loss_fake']:.4f}",
                                    gn=f"{stats['grad_norm_generator']:.3f}", its=f"{stats['it_per_s']:.2f}")
                    on_main(log_line, accelerator, run_dir / "log.jsonl", stats)
                if inputs.validation_prompts and (
                    (cfg.validate_every and run.step % cfg.validate_every == 0) or run.step == cfg.iterations
                ):
                    on_main(validation_grid, run, cache, inputs.validation_prompts, teacher, accelerator)
                saved = run.step % cfg.checkpoint_every == 0 or run.step == last_step
                if saved:
                    on_main(run.save)
                signum = stop.agreed(world, device)
                if signum is not None:
                    if not saved:
                        on_main(run.save)
                    if main:
                        print(f"stopped after iteration {run.step}: saved {ckpt.checkpoint_dir(run_dir, run.step)}; "
                              "run the same command again to resume")
                    raise Interrupted(signum)
    finally:
        bar.close()
