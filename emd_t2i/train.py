"""The distillation run: one flat EMD loop on accelerate, with logs, sample grids, checkpoints and resume."""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import DistillConfig
from .ema import ema_decay_at, update_ema
from .emd import fake_score_step, generator_step, sample_timesteps
from .errors import UserError
from .images import decode_latents, make_grid, to_pil
from .prompts import EmbeddingCache, load_prompts, truncate_report
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
from .teachers import load_teacher

MAX_BAD_STEPS = 10  # consecutive non-finite losses before the run stops (after saving)


# ---------------------------------------------------------------- the run folder
def prepare_run_dir(cfg: DistillConfig, overwrite: bool) -> Path:
    """Create the run folder, or check that an existing one belongs to this config (then it resumes).

    A folder made for a different config is refused; with `overwrite` it is moved aside, never deleted.
    """
    run_dir = Path(cfg.output)
    saved = run_dir / "config.json"
    if saved.exists():
        previous = DistillConfig.load(saved)
        changed = cfg.differences(previous)
        if changed and not overwrite:
            raise UserError(
                f"--output {run_dir} holds a run with a different config ({', '.join(changed)}); "
                "use another --output, the same flags to resume, or --overwrite to start over"
            )
        if changed:
            backup = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(backup)
            print(f"moved the previous run to {backup}")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"--output {run_dir} exists and is not an emd-t2i run; choose an empty or new folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    return run_dir


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, last_step: int) -> None:
    """On resume, drop log lines written after the checkpoint we resume from (they will be redone)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


# ---------------------------------------------------------------- randomness and data order
def step_rng(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """Per-step reseeding from (seed, rank, step): a resumed run draws exactly what an uninterrupted one does."""
    state = int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def spread(items: list, n: int) -> list:
    """n items evenly spaced through a list (validation prompts that cover a dataset, not its first lines)."""
    return [items[i * len(items) // n] for i in range(n)] if len(items) > n else list(items)


def batch_prompts(prompts: list[str], seed: int, step: int, rank: int, world: int, batch: int) -> list[str]:
    """The prompts of one (step, rank): consecutive slices of per-epoch permutations, so every prompt is seen
    once per epoch; the data position is a function of the step (nothing else to checkpoint)."""
    n = len(prompts)
    start = (step * world + rank) * batch
    out = []
    for position in range(start, start + batch):
        epoch, index = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(prompts[int(order[index])])
    return out


# ---------------------------------------------------------------- pieces of the loop
@dataclass
class Run:
    """The live state of a run: what the loop mutates and the checkpoint saves."""

    roles: Roles
    opt_generator: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    ema: list[torch.Tensor] | None = None  # EMA of the generator LoRA weights, in adapter_parameters order
    step: int = 0
    bad_steps: int = 0

    def generator_params(self) -> list[torch.nn.Parameter]:
        return adapter_parameters(self.roles.unet, GENERATOR)

    def exported_weights(self):
        """The generator as it is exported: the EMA weights swapped in while the block runs (if kept)."""
        return swapped_weights(self.generator_params(), self.ema) if self.ema is not None else nullcontext()


def make_accelerator(cfg: DistillConfig, run_dir: Path):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: no CUDA device is visible; use --device cpu")
    log_with = None if cfg.report_to == "none" else cfg.report_to
    if _accelerator_state_differs(cfg.mixed_precision, cpu):
        # accelerate keeps a process-wide singleton; a second run in the same process (a notebook, a sweep,
        # the test suite) with another precision would be refused. The process group itself is kept.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu, log_with=log_with, project_dir=str(run_dir))


def _accelerator_state_differs(mixed_precision: str, cpu: bool) -> bool:
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if not state:
        return False
    return state.get("_mixed_precision") != mixed_precision or (cpu and state.get("device", torch.device("cpu")).type != "cpu")


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The frozen base goes to half precision under mixed precision; LoRA weights stay float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def save(run: Run, run_dir: Path, cfg: DistillConfig, accelerator) -> Path | None:
    if not accelerator.is_main_process:
        return None
    unet = run.roles.unet
    state = {
        "step": run.step,
        "opt_generator": run.opt_generator.state_dict(),
        "opt_fake": run.opt_fake.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    adapters = {name: adapter_state_dict(unet, name) for name in (GENERATOR, FAKE_SCORE)}
    if run.ema is not None:
        with run.exported_weights():
            adapters[ckpt.GENERATOR_EMA] = adapter_state_dict(unet, GENERATOR)
    return ckpt.save_checkpoint(run_dir, run.step, adapters, state, keep=cfg.keep_checkpoints,
                                metadata={"step": str(run.step), "teacher": cfg.teacher})


def resume(run: Run, run_dir: Path) -> None:
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        return
    adapters = ckpt.load_adapters(latest)
    if run.ema is not None:  # the EMA goes through the generator adapter first, then the raw weights replace it
        load_adapter_state_dict(run.roles.unet, GENERATOR, adapters.pop(ckpt.GENERATOR_EMA))
        run.ema = [p.detach().clone() for p in run.generator_params()]
    for name in (GENERATOR, FAKE_SCORE):
        load_adapter_state_dict(run.roles.unet, name, adapters[name])
    state = ckpt.load_training_state(latest)
    run.opt_generator.load_state_dict(state["opt_generator"])
    run.opt_fake.load_state_dict(state["opt_fake"])
    torch.set_rng_state(state["torch_rng"])
    run.step = state["step"]
    truncate_log(run_dir / "log.jsonl", run.step)
    print(f"resuming from {latest} (iteration {run.step})")


def validation_grid(run: Run, cache: EmbeddingCache, prompts: list[str], teacher, seed: int, path: Path):
    """One-step samples for fixed prompts and seeds (seed + i for prompt i), decoded and saved as one PNG."""
    device = next(run.roles.unet.parameters()).device
    shape = (teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(len(prompts))])
    with torch.no_grad(), run.exported_weights():
        x0 = run.roles.generator(z.to(device), cache.get(prompts, device=device))
        run.roles.activate(None)
    images = to_pil(decode_latents(teacher.vae, x0, teacher.scaling_factor))
    grid = make_grid(images, columns=min(len(images), 8))
    tmp = path.with_name(f".{path.name}.tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return grid


def average_gradients(accelerator, params) -> None:
    """All-reduce (mean) LoRA gradients across processes. The UNet is not wrapped in DDP: its forwards use a
    different parameter subset per role and several forwards precede one backward, which DDP's reducer does
    not allow; one explicit all-reduce per optimizer step is equivalent and simpler."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    assert len(grads) == len(params), "every LoRA weight of the role being trained must have a gradient"
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_and_step(accelerator, optimizer, params, max_norm: float) -> float:
    """Average, clip and step; a non-finite gradient norm (the same on every rank) skips the step."""
    average_gradients(accelerator, params)
    norm = float(accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def lr_scale(schedule: str, step: int, iterations: int) -> float:
    """The factor on both base learning rates at a step: 1 (constant), or a cosine from 1 to 0 over the run.
    A function of the step alone, so a resumed run continues the same curve with nothing to checkpoint."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step, iterations) / iterations))


def set_learning_rates(run: Run, cfg: DistillConfig) -> float:
    scale = lr_scale(cfg.lr_schedule, run.step, cfg.iterations)
    for optimizer, base in ((run.opt_generator, cfg.generator_lr), (run.opt_fake, cfg.fake_lr)):
        for group in optimizer.param_groups:
            group["lr"] = base * scale
    return scale


# ---------------------------------------------------------------- the loop
def distill(cfg: DistillConfig, overwrite: bool = False, stop_after: int | None = None) -> Path:
    """Run (or resume) EMD distillation. `stop_after` ends early after that many iterations in this call
    (checkpointing first), as a crash or Ctrl-C would; running again continues."""
    run_dir = Path(cfg.output)
    accelerator = make_accelerator(cfg, run_dir)
    if accelerator.is_main_process:
        prepare_run_dir(cfg, overwrite)
    accelerator.wait_for_everyone()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # Teacher, one UNet in three roles, optimizers.
    teacher = load_teacher(cfg.teacher, dtype=weight_dtype(cfg.mixed_precision), device=device)
    unet = teacher.unet
    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random (B = 0): seed them for reproducible runs
    add_roles(unet, cfg.generator_rank, cfg.fake_rank, cfg.target_modules)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    roles = Roles(unet, teacher.alphas_cumprod, teacher.prediction_type, cfg.t_star, cfg.guidance_scale)
    gen_params, fake_params = adapter_parameters(unet, GENERATOR), adapter_parameters(unet, FAKE_SCORE)
    opt_g = torch.optim.AdamW(gen_params, lr=cfg.generator_lr, weight_decay=0.0)
    opt_f = torch.optim.AdamW(fake_params, lr=cfg.fake_lr, weight_decay=0.0)
    opt_g, opt_f = accelerator.prepare(opt_g, opt_f)
    run = Run(roles, opt_g, opt_f, ema=[p.detach().clone() for p in gen_params] if cfg.ema_decay > 0 else None)

    # Prompts, their embeddings (each encoded once), the null prompt for guidance.
    prompts = load_prompts(cfg.prompts, column=cfg.prompt_column) if cfg.prompts else default_prompts(cfg)
    truncate_report(teacher.tokenizer, prompts)
    cache = EmbeddingCache(teacher.tokenizer, teacher.text_encoder)
    validation_prompts = spread(list(dict.fromkeys(prompts)), cfg.num_validation_prompts)

    resume(run, run_dir)
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("emd-t2i", config={k: str(v) for k, v in cfg.to_dict().items()})
    (run_dir / "samples").mkdir(exist_ok=True)
    log_path = run_dir / "log.jsonl"
    latent_shape = (cfg.batch_size, teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    last_step = cfg.iterations if stop_after is None else min(cfg.iterations, run.step + stop_after)
    bar = tqdm(total=cfg.iterations, initial=run.step, disable=not accelerator.is_main_process, desc="emd")
    tic, rows_at_tic, step_at_tic = time.perf_counter(), roles.unet_rows, run.step
    try:
        while run.step < last_step:
            stats = {"loss_generator": 0.0, "loss_fake": 0.0, "weight": 0.0, "eps_tilde_rms": 0.0,
                     "lr_scale": set_learning_rates(run, cfg)}
            fake_samples = []
            # ---- E-step and M-step (M1), over gradient-accumulation micro-batches
            for micro in range(cfg.grad_accum):
                rng = step_rng(cfg.seed, rank, run.step * cfg.grad_accum + micro, device)
                batch = batch_prompts(prompts, cfg.seed, run.step * cfg.grad_accum + micro, rank, world,
                                      cfg.batch_size)
                cond = cache.get(batch, device=device)
                uncond = cache.null_embedding(device=device).expand_as(cond)
                z0 = torch.randn(latent_shape, generator=rng, device=device)
                eps0 = torch.randn(latent_shape, generator=rng, device=device)
                t = sample_timesteps(cfg.batch_size, cfg.t_min, cfg.t_max, device, rng)
                generator, teacher_eps, fake_eps = roles.bind(cond, uncond)
                with accelerator.autocast():
                    g = generator_step(
                        generator, teacher_eps, fake_eps, z0, eps0, t, teacher.alphas_cumprod, cfg.num_langevin_steps, cfg.gamma_eps,
                        cfg.gamma_z, cfg.noise_cancellation, cfg.weighting, rng, cfg.cancel_initial_noise,
                    )
                accelerator.backward(g.loss / cfg.grad_accum)
                fake_samples.append((g.x0_sample, generator, fake_eps, rng))
                stats["loss_generator"] += g.loss.item() / cfg.grad_accum
                stats["weight"] += g.weight_mean / cfg.grad_accum
                stats["eps_tilde_rms"] += g.eps_tilde_rms / cfg.grad_accum
            stats["grad_norm_generator"] = clip_and_step(accelerator, opt_g, gen_params, cfg.max_grad_norm)
            if run.ema is not None:
                update_ema(run.ema, gen_params, ema_decay_at(cfg.ema_decay, run.step))

            # ---- fake-score updates (F1): the first on g(z_0) from the E-step, further ones on fresh samples
            for update in range(cfg.fake_updates):
                for x0, generator, fake_eps, rng in fake_samples:
                    if update > 0:
                        with torch.no_grad(), accelerator.autocast():
                            x0 = generator(torch.randn(latent_shape, generator=rng, device=device))
                    t = sample_timesteps(cfg.batch_size, cfg.t_min, cfg.t_max, device, rng)
                    with accelerator.autocast():
                        loss_f = fake_score_step(fake_eps, x0, t, teacher.alphas_cumprod, rng)
                    accelerator.backward(loss_f / (cfg.grad_accum * cfg.fake_updates))
                    stats["loss_fake"] += loss_f.item() / (cfg.grad_accum * cfg.fake_updates)
                stats["grad_norm_fake"] = clip_and_step(accelerator, opt_f, fake_params, cfg.max_grad_norm)
            roles.activate(None)

            # ---- no NaN is hidden: non-finite steps were skipped above; count them, stop when they persist
            if not all(math.isfinite(stats[k]) for k in ("grad_norm_generator", "grad_norm_fake")):
                run.bad_steps += 1
                if run.bad_steps >= MAX_BAD_STEPS:
                    save(run, run_dir, cfg, accelerator)
                    raise FloatingPointError(f"{MAX_BAD_STEPS} non-finite losses in a row at iteration {run.step}; "
                                             "lower the learning rates or use bf16 instead of fp16")
            else:
                run.bad_steps = 0
            run.step += 1
            bar.update(1)

            # ---- watch: logs, grids, checkpoints
            if run.step % cfg.log_every == 0 or run.step == last_step:
                elapsed = time.perf_counter() - tic
                stats.update(step=run.step, it_per_s=(run.step - step_at_tic) / elapsed,
                             unet_rows_per_it=(roles.unet_rows - rows_at_tic) / max(run.step - step_at_tic, 1),
                             non_finite=run.bad_steps)
                tic, rows_at_tic, step_at_tic = time.perf_counter(), roles.unet_rows, run.step
                bar.set_postfix(g=f"{stats['loss_generator']:.4f}", f=f"{stats['loss_fake']:.4f}",
                                gn=f"{stats['grad_norm_generator']:.3f}", its=f"{stats['it_per_s']:.2f}")
                if accelerator.is_main_process:
                    append_jsonl(log_path, stats)
                    accelerator.log({k: v for k, v in stats.items() if k != "step"}, step=run.step)
            if accelerator.is_main_process and (
                (cfg.validate_every and run.step % cfg.validate_every == 0) or run.step == cfg.iterations
            ):
                grid = validation_grid(run, cache, validation_prompts, teacher, cfg.seed,
                                       run_dir / "samples" / f"step-{run.step:06d}.png")
                _log_image(accelerator, cfg, grid, run.step)
            if run.step % cfg.checkpoint_every == 0 or run.step == last_step:
                save(run, run_dir, cfg, accelerator)
    except KeyboardInterrupt:
        path = save(run, run_dir, cfg, accelerator)
        print(f"\ninterrupted: saved {path}; run the same command again to resume")
        raise
    finally:
        bar.close()
        accelerator.end_training()
    return run_dir


def default_prompts(cfg: DistillConfig) -> list[str]:
    """Without --prompts, a teacher that knows its own domain (the toy) supplies captions; others need --prompts."""
    if cfg.teacher == "toy":
        from .toy.domain import all_captions

        return all_captions()
    raise UserError("--prompts is required for this teacher (a .txt/.jsonl/.csv file, a folder, or hf:NAME)")


def _log_image(accelerator, cfg: DistillConfig, grid, step: int) -> None:
    if cfg.report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    elif cfg.report_to == "wandb":
        import wandb

        accelerator.log({"samples": wandb.Image(grid)}, step=step)

