"""The distillation run: one flat EMD loop on accelerate, with logs, sample grids, checkpoints and resume."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import grids
from .config import DistillConfig, resolve_mixed_precision
from .distributed import agreed, check_ranks_agree, make_accelerator
from .ema import ema_decay_at, update_ema
from .embeddings import open_embeddings
from .emd import EMDSettings
from .errors import UserError
from .files import save_image_atomic
from .images import decode_latents, to_pil
from .interrupt import Interrupted, StopRequest
from .iteration import (
    Window,
    fake_score_updates,
    finite_iteration,
    generator_update,
    global_means,
    make_batch,
    measure_jacobian_norm,
)
from .optim import lr_scale, make_scaler
from .profiling import UNetClock
from .prompts import distinct_spread, open_prompts, truncate_report
from .roles import (
    FAKE_SCORE,
    GENERATOR,
    Roles,
    adapter_parameters,
    adapter_state_dict,
    add_roles,
    load_adapter_state_dict,
    swapped_weights,
)
from .run_folder import append_jsonl, claim_run_dir, record_config, truncate_log
from .teachers import load_teacher

MAX_BAD_STEPS = 10  # consecutive non-finite losses before the run stops (after saving)


# ---------------------------------------------------------------- pieces of the loop
@dataclass
class Run:
    """The live state of a run: what the loop mutates and the checkpoint saves."""

    roles: Roles
    opt_generator: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    scaler_generator: torch.amp.GradScaler
    scaler_fake: torch.amp.GradScaler
    ema: list[torch.Tensor] | None = None  # EMA of the generator LoRA weights, in adapter_parameters order
    step: int = 0
    bad_steps: int = 0
    jacobian_norm: float | None = None  # the generator's |J| for --z-step jacobian, refreshed every jacobian_every
    error_table: torch.Tensor | None = None  # running mean of DMD's error per t bin, for --weighting dmd-t

    def generator_params(self) -> list[torch.nn.Parameter]:
        """The generator's LoRA weights, as its optimizer holds them (no walk over the UNet's parameters)."""
        return self.opt_generator.param_groups[0]["params"]

    def fake_params(self) -> list[torch.nn.Parameter]:
        return self.opt_fake.param_groups[0]["params"]

    def exported_weights(self):
        """The generator as it is exported: the EMA weights swapped in while the block runs (if kept)."""
        return swapped_weights(self.generator_params(), self.ema) if self.ema is not None else nullcontext()


def mixed_precision_on(device: torch.device, requested: str) -> str:
    """What --mixed-precision means on this device ("auto": bf16 on CUDA, as DMD2 trains; none on CPU)."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return resolve_mixed_precision(requested, device.type, bf16)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The frozen base goes to half precision under mixed precision; LoRA weights stay float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def emd_settings(cfg: DistillConfig) -> EMDSettings:
    return EMDSettings(num_steps=cfg.num_langevin_steps, gamma_eps=cfg.gamma_eps, gamma_z=cfg.gamma_z,
                       noise_cancellation=cfg.noise_cancellation, weighting=cfg.weighting,
                       cancel_initial_noise=cfg.cancel_initial_noise, t_min=cfg.t_min, t_max=cfg.t_max,
                       z_step=cfg.z_step)


def save(run: Run, cfg: DistillConfig, precision: str, world: int) -> Path:
    """A checkpoint of the run as it is (the main process writes it)."""
    unet = run.roles.unet
    state = {
        "step": run.step,
        "mixed_precision": precision,  # what --mixed-precision resolved to on this machine
        "world_size": world,
        "global_batch": cfg.global_batch(world),
        "opt_generator": run.opt_generator.state_dict(),
        "opt_fake": run.opt_fake.state_dict(),
        "scaler_generator": run.scaler_generator.state_dict(),
        "scaler_fake": run.scaler_fake.state_dict(),
        "jacobian_norm": run.jacobian_norm,
        "error_table": run.error_table,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    adapters = {name: adapter_state_dict(unet, name) for name in (GENERATOR, FAKE_SCORE)}
    if run.ema is not None:
        with run.exported_weights():
            adapters[ckpt.GENERATOR_EMA] = adapter_state_dict(unet, GENERATOR)
    return ckpt.save_checkpoint(cfg.output, run.step, adapters, state, keep=cfg.keep_checkpoints,
                                metadata={"step": str(run.step), "teacher": cfg.teacher,
                                          "mixed_precision": precision})


def resume(run: Run, cfg: DistillConfig, accelerator) -> None:
    """Continue from the newest intact checkpoint (the main process picks it, every process loads it: the run
    folder must be on storage all processes see), or start at 0; either way the log is cut to match."""
    from accelerate.utils import broadcast_object_list

    run_dir, world = Path(cfg.output), accelerator.num_processes
    needed = (GENERATOR, FAKE_SCORE) + ((ckpt.GENERATOR_EMA,) if run.ema is not None else ())

    def pick():
        found = ckpt.latest_intact_checkpoint(run_dir, needed)
        if found and found[2].get("global_batch", cfg.global_batch(world)) != cfg.global_batch(world):
            raise UserError(f"{found[0]} was made at a global batch of {found[2]['global_batch']}, config.json says "
                            f"{cfg.global_batch(world)}: restore the run's config.json, or start over with --overwrite")
        truncate_log(run_dir / "log.jsonl", found[2]["step"] if found else 0)
        return found

    found = agreed(accelerator, pick, main_only=True)
    step = found[2]["step"] if found else -1
    if world > 1:
        (step,) = broadcast_object_list([step])
    if step < 0:
        return

    def read():  # the other processes read the checkpoint the main process chose
        if found:
            return found
        path = ckpt.checkpoint_dir(run_dir, step)
        try:
            return (path, *ckpt.read_checkpoint(path, needed))
        except ckpt.DamagedCheckpoint as err:
            raise UserError(f"process {accelerator.process_index} cannot read {path} ({err}): the run folder must "
                            "be on storage every process sees") from err

    latest, adapters, state = agreed(accelerator, read)
    if run.ema is not None:  # the EMA goes through the generator adapter first, then the raw weights replace it
        load_adapter_state_dict(run.roles.unet, GENERATOR, adapters.pop(ckpt.GENERATOR_EMA))
        run.ema = [p.detach().clone() for p in run.generator_params()]
    for name in (GENERATOR, FAKE_SCORE):
        load_adapter_state_dict(run.roles.unet, name, adapters[name])
    run.opt_generator.load_state_dict(state["opt_generator"])
    run.opt_fake.load_state_dict(state["opt_fake"])
    if state.get("scaler_generator"):
        run.scaler_generator.load_state_dict(state["scaler_generator"])
        run.scaler_fake.load_state_dict(state["scaler_fake"])
    torch.set_rng_state(state["torch_rng"])
    run.jacobian_norm, run.error_table = state.get("jacobian_norm"), state.get("error_table")
    run.step = state["step"]
    if accelerator.is_main_process:
        print(f"resuming from {latest} (iteration {run.step})")


def validation_grid(run: Run, cache, prompts: list[str], teacher, cfg: DistillConfig, accelerator) -> None:
    """One-step samples for fixed prompts and seeds (seed + i for prompt i) beside the teacher's N-step images from
    the same noise at the run's guidance (made once, kept in samples/teacher/), labelled, saved as one PNG and sent
    to the tracker."""
    device = next(run.roles.unet.parameters()).device
    shape = (teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad(), run.exported_weights():
        x0 = run.roles.generator(z.to(device), cache.get(prompts, device=device))
        run.roles.activate(None)
    images = to_pil(decode_latents(teacher.vae, x0, teacher.scaling_factor))
    samples = Path(cfg.output) / "samples"
    reference = grids.teacher_reference(teacher, prompts, seeds, z, cfg.guidance_scale, samples / "teacher")
    grid = grids.validation_figure(reference, images, prompts, seeds, grids.TEACHER_STEPS, cfg.guidance_scale,
                                   run.step)
    save_image_atomic(samples / f"step-{run.step:06d}.png", grid)
    _log_image(accelerator, cfg, grid, run.step)


def set_learning_rates(run: Run, cfg: DistillConfig) -> float:
    scale = lr_scale(cfg.lr_schedule, run.step, cfg.iterations, cfg.lr_warmup)
    for optimizer, base in ((run.opt_generator, cfg.generator_lr), (run.opt_fake, cfg.fake_lr)):
        for group in optimizer.param_groups:
            group["lr"] = base * scale
    return scale


# ---------------------------------------------------------------- the loop
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
    teacher = load_teacher(cfg.teacher, dtype=weight_dtype(precision), device=device)
    prompts = open_prompts(cfg.prompts, column=cfg.prompt_column) if cfg.prompts else default_prompts(cfg)
    truncate_report(teacher.tokenizer, prompts)
    cache = open_embeddings(teacher.tokenizer, teacher.conditioning_encoder(), prompts, cfg.embeddings,
                            max_entries=cfg.embedding_cache)
    return Inputs(teacher, prompts, cache, distinct_spread(prompts, cfg.num_validation_prompts))


def start_run(cfg: DistillConfig, unet, teacher, device: torch.device, precision: str, clock) -> Run:
    """One UNet in three roles, the optimizers, the loss scalers and the EMA, at iteration 0."""
    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random (B = 0): seed them for reproducible runs
    add_roles(unet, cfg.generator_rank, cfg.fake_rank, cfg.target_modules)
    roles = Roles(unet, teacher.alphas_cumprod, teacher.prediction_type, cfg.t_star, cfg.guidance_scale, clock)
    if cfg.gradient_checkpointing:
        roles.enable_gradient_checkpointing()
    gen_params, fake_params = adapter_parameters(unet, GENERATOR), adapter_parameters(unet, FAKE_SCORE)
    opt_g = torch.optim.AdamW(gen_params, lr=cfg.generator_lr, weight_decay=0.0)
    opt_f = torch.optim.AdamW(fake_params, lr=cfg.fake_lr, weight_decay=0.0)
    return Run(roles, opt_g, opt_f, make_scaler(device, precision), make_scaler(device, precision),
               ema=[p.detach().clone() for p in gen_params] if cfg.ema_decay > 0 else None)


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
    run = start_run(cfg, teacher.unet, teacher, device, precision, clock)
    settings = emd_settings(cfg)

    def autocast():
        return torch.autocast(device.type, dtype=weight_dtype(precision), enabled=precision != "no")

    def on_main(fn, *args):  # the main process writes the run folder; a failed write stops every process
        return agreed(accelerator, fn, *args, main_only=True)

    check_ranks_agree(teacher.unet, accelerator, "at start")
    resume(run, cfg, accelerator)
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
                stats = {"loss_generator": 0.0, "loss_fake": 0.0, "weight": 0.0, "eps_tilde_rms": 0.0,
                         "lr_scale": set_learning_rates(run, cfg)}
                batch = agreed(accelerator, make_batch, cfg, settings, prompts, cache, latent_shape, run.step, rank,
                               world, device)
                if settings.z_step == "jacobian" and (run.step % cfg.jacobian_every == 0 or run.jacobian_norm is None):
                    run.jacobian_norm = agreed(accelerator, measure_jacobian_norm, run, cfg, prompts, cache,
                                               latent_shape, world, device, autocast)
                stats["jacobian_norm"] = run.jacobian_norm
                x0_samples = generator_update(run, cfg, settings, batch, teacher.alphas_cumprod, autocast, world,
                                              stats)
                if run.ema is not None:
                    update_ema(run.ema, run.generator_params(), ema_decay_at(cfg.ema_decay, run.step))
                fake_score_updates(run, cfg, batch, x0_samples, teacher.alphas_cumprod, autocast, world, stats)
                global_means(stats, world, device)

                # ---- no NaN is hidden: non-finite steps were skipped above; count them, stop when they persist
                if not finite_iteration(stats, precision == "fp16"):
                    run.bad_steps += 1
                    if run.bad_steps >= MAX_BAD_STEPS:
                        on_main(save, run, cfg, precision, world)
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
                    on_main(validation_grid, run, cache, inputs.validation_prompts, teacher, cfg, accelerator)
                saved = run.step % cfg.checkpoint_every == 0 or run.step == last_step
                if saved:
                    on_main(save, run, cfg, precision, world)
                signum = stop.agreed(world, device)
                if signum is not None:
                    if not saved:
                        on_main(save, run, cfg, precision, world)
                    if main:
                        print(f"stopped after iteration {run.step}: saved {ckpt.checkpoint_dir(run_dir, run.step)}; "
                              "run the same command again to resume")
                    raise Interrupted(signum)
    finally:
        bar.close()


def log_line(accelerator, path: Path, stats: dict) -> None:
    append_jsonl(path, stats)
    accelerator.log({k: v for k, v in stats.items() if k != "step"}, step=stats["step"])


def default_prompts(cfg: DistillConfig) -> list[str]:
    """Without --prompts, a teacher that knows its own domain (the toy) supplies its captions, full and partial (the
    partial ones are where a student shows whether it covers the teacher's modes); others need --prompts."""
    if cfg.teacher == "toy":
        from .toy.domain import all_captions, partial_captions

        return all_captions() + partial_captions()
    raise UserError("--prompts is required for this teacher (a .txt/.jsonl/.csv file, a folder, or hf:NAME)")


def _log_image(accelerator, cfg: DistillConfig, grid, step: int) -> None:
    if cfg.report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    elif cfg.report_to == "wandb":
        import wandb

        accelerator.log({"samples": wandb.Image(grid)}, step=step)

