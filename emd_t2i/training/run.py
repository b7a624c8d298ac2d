"""The live state of a distillation run and what one iteration does with it: the generator update (E-step, then the
(M1) step), the fake-score updates (F1), the running estimates (|J|, the per-t table of "dmd-t"), the EMA, and saving
and resuming all of it."""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from emd_t2i.emd import (
    TIMESTEP_BINS,
    EMDSettings,
    bin_sums,
    fake_score_step,
    generator_jacobian_norm,
    generator_step,
    timestep_bin,
    update_error_table,
)
from emd_t2i.errors import UserError
from emd_t2i.models.roles import (
    FAKE_SCORE,
    GENERATOR,
    Roles,
    adapter_parameters,
    adapter_state_dict,
    add_roles,
    load_adapter_state_dict,
    swapped_weights,
)
from emd_t2i.training import checkpoint as ckpt
from emd_t2i.training.batch import Batch, batch_prompts, sample_rng
from emd_t2i.training.config import DistillConfig, resolve_mixed_precision
from emd_t2i.training.distributed import agreed
from emd_t2i.training.optim import ema_decay_at, lr_scale, make_scaler, optimizer_step, update_ema
from emd_t2i.training.run_folder import truncate_log

JACOBIAN_SAMPLES = 4  # generator samples whose |J| is measured (the largest is used)


def emd_settings(cfg: DistillConfig) -> EMDSettings:
    """The chain and the weighting of a run, bound once."""
    return EMDSettings(num_steps=cfg.num_langevin_steps, gamma_eps=cfg.gamma_eps, gamma_z=cfg.gamma_z,
                       noise_cancellation=cfg.noise_cancellation, weighting=cfg.weighting,
                       cancel_initial_noise=cfg.cancel_initial_noise, t_min=cfg.t_min, t_max=cfg.t_max,
                       z_step=cfg.z_step)


def mixed_precision_on(device: torch.device, requested: str) -> str:
    """What --mixed-precision means on this device ("auto": bf16 on CUDA, as DMD2 trains; none on CPU)."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return resolve_mixed_precision(requested, device.type, bf16)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The frozen base goes to half precision under mixed precision; LoRA weights stay float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


@dataclass(frozen=True)
class GeneratorStats:
    """One generator update on this process: means over its micro-batches, and the step's gradient norm."""

    loss: float  # (M1)
    weight: float  # w(t) of (M1)
    eps_tilde_rms: float
    grad_norm: float  # after the all-reduce; inf or nan when the step was skipped


@dataclass(frozen=True)
class FakeStats:
    """The fake-score updates of one iteration: the mean loss (F1) and the mean gradient norm over the updates."""

    loss: float
    grad_norm: float


@dataclass
class Run:
    """The live state of a run: what an iteration changes and a checkpoint saves."""

    cfg: DistillConfig
    settings: EMDSettings
    roles: Roles
    alphas_cumprod: torch.Tensor
    device: torch.device
    precision: str  # what --mixed-precision resolved to on this machine
    world: int
    opt_generator: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    scaler_generator: torch.amp.GradScaler
    scaler_fake: torch.amp.GradScaler
    ema: list[torch.Tensor] | None = None  # EMA of the generator LoRA weights, in adapter_parameters order
    step: int = 0
    bad_steps: int = 0
    jacobian_norm: float | None = None  # the generator's |J| for --z-step jacobian, refreshed every jacobian_every
    error_table: torch.Tensor | None = None  # running mean of DMD's error per t bin, for --weighting dmd-t

    @classmethod
    def start(cls, cfg: DistillConfig, teacher, device: torch.device, precision: str, world: int, clock) -> Run:
        """One UNet in three roles, the optimizers, the loss scalers and the EMA, at iteration 0."""
        unet = teacher.unet
        torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random (B = 0): seed them for reproducible runs
        add_roles(unet, cfg.generator_rank, cfg.fake_rank, cfg.target_modules)
        roles = Roles(unet, teacher.alphas_cumprod, teacher.prediction_type, cfg.t_star, cfg.guidance_scale, clock)
        if cfg.gradient_checkpointing:
            roles.enable_gradient_checkpointing()
        gen_params, fake_params = adapter_parameters(unet, GENERATOR), adapter_parameters(unet, FAKE_SCORE)
        opt_g = torch.optim.AdamW(gen_params, lr=cfg.generator_lr, weight_decay=0.0)
        opt_f = torch.optim.AdamW(fake_params, lr=cfg.fake_lr, weight_decay=0.0)
        return cls(cfg, emd_settings(cfg), roles, teacher.alphas_cumprod, device, precision, world, opt_g, opt_f,
                   make_scaler(device, precision), make_scaler(device, precision),
                   ema=[p.detach().clone() for p in gen_params] if cfg.ema_decay > 0 else None)

    # ------------------------------------------------------------ the weights
    def generator_params(self) -> list[torch.nn.Parameter]:
        """The generator's LoRA weights, as its optimizer holds them (no walk over the UNet's parameters)."""
        return self.opt_generator.param_groups[0]["params"]

    def fake_params(self) -> list[torch.nn.Parameter]:
        return self.opt_fake.param_groups[0]["params"]

    def exported_weights(self):
        """The generator as it is exported: the EMA weights swapped in while the block runs (if kept)."""
        return swapped_weights(self.generator_params(), self.ema) if self.ema is not None else nullcontext()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=weight_dtype(self.precision), enabled=self.precision != "no")

    def set_learning_rates(self) -> float:
        cfg = self.cfg
        scale = lr_scale(cfg.lr_schedule, self.step, cfg.iterations, cfg.lr_warmup)
        for optimizer, base in ((self.opt_generator, cfg.generator_lr), (self.opt_fake, cfg.fake_lr)):
            for group in optimizer.param_groups:
                group["lr"] = base * scale
        return scale

    def update_ema(self) -> None:
        if self.ema is not None:
            update_ema(self.ema, self.generator_params(), ema_decay_at(self.cfg.ema_decay, self.step))

    # ------------------------------------------------------------ one iteration
    def generator_update(self, batch: Batch) -> tuple[GeneratorStats, list[torch.Tensor]]:
        """E-step and M-step (M1) over the micro-batches, then one optimizer step; also returns each micro-batch's
        g(z_0) for the first fake-score update. Weighting "dmd-t" then updates its table with the global batch."""
        cfg, settings, roles, size = self.cfg, self.settings, self.roles, self.cfg.batch_size
        loss = weight = eps_tilde_rms = 0.0
        x0_samples = []
        sums = counts = torch.zeros(TIMESTEP_BINS, dtype=torch.float64)
        for i in range(cfg.grad_accum):
            rows = batch.micro(i, size)
            generator, teacher_eps, fake_eps = roles.bind(batch.cond[rows], batch.uncond[rows])
            draws = batch.draws.rows(rows.start, rows.stop)
            with self.autocast():
                g = generator_step(generator, teacher_eps, fake_eps, self.alphas_cumprod, draws, settings,
                                   jacobian_norm=self.jacobian_norm, error_table=self.error_table)
            self.scaler_generator.scale(g.loss / cfg.grad_accum).backward()
            x0_samples.append(g.x0_sample)
            loss += g.loss.item() / cfg.grad_accum
            weight += g.weight_mean / cfg.grad_accum
            eps_tilde_rms += g.eps_tilde_rms / cfg.grad_accum
            if settings.weighting == "dmd-t":
                batch_sums, batch_counts = bin_sums(timestep_bin(draws.t, settings.t_min, settings.t_max), g.error)
                sums, counts = sums + batch_sums, counts + batch_counts
        grad_norm = optimizer_step(self.opt_generator, self.scaler_generator, self.generator_params(),
                                   cfg.max_grad_norm, self.world)
        if settings.weighting == "dmd-t":  # the table is updated with the whole global batch, after its step
            if self.world > 1:
                both = torch.stack([sums, counts]).to(batch.cond.device)
                torch.distributed.all_reduce(both)
                sums, counts = both.cpu()
            table = self.error_table if self.error_table is not None else torch.full_like(sums, float("nan"))
            self.error_table = update_error_table(table, sums, counts)
        return GeneratorStats(loss, weight, eps_tilde_rms, grad_norm), x0_samples

    def fake_score_updates(self, batch: Batch, x0_samples: list[torch.Tensor]) -> FakeStats:
        """`fake_updates` steps of (F1): the first on the E-step's g(z_0), further ones on fresh generator samples."""
        cfg, roles, size = self.cfg, self.roles, self.cfg.batch_size
        loss, norms = 0.0, []
        for fake in batch.fake:
            for i in range(cfg.grad_accum):
                rows = batch.micro(i, size)
                generator, _, fake_eps = roles.bind(batch.cond[rows], batch.uncond[rows])
                x0 = x0_samples[i]
                if fake.z is not None:
                    with torch.no_grad(), self.autocast():
                        x0 = generator(fake.z[rows])
                with self.autocast():
                    loss_f = fake_score_step(fake_eps, x0, fake.t[rows], fake.eps[rows], self.alphas_cumprod)
                self.scaler_fake.scale(loss_f / (cfg.grad_accum * cfg.fake_updates)).backward()
                loss += loss_f.item() / (cfg.grad_accum * cfg.fake_updates)
            norms.append(optimizer_step(self.opt_fake, self.scaler_fake, self.fake_params(), cfg.max_grad_norm,
                                        self.world))
        roles.activate(None)
        return FakeStats(loss, sum(norms) / len(norms))  # inf or nan if any update was skipped

    def measure_jacobian_norm(self, prompts, cache, latent_shape: tuple[int, ...]) -> float:
        """The generator's Jacobian norm |J| (emd.generator_jacobian_norm) at z ~ N(0, I) for the first prompts of
        this step's global batch: the same inputs on every process, so every process gets the same number."""
        cfg, rows = self.cfg, range(JACOBIAN_SAMPLES)
        cond = cache.get(batch_prompts(prompts, cfg.seed, self.step, rows, cfg.global_batch(self.world)),
                         device=self.device)
        rng = sample_rng(cfg.seed, self.step, 2**32)  # a stream no sample of the batch uses
        z = torch.randn((len(rows), *latent_shape), generator=rng).to(self.device)
        generator = functools.partial(self.roles.generator, cond=cond)
        with self.autocast():
            norms = generator_jacobian_norm(generator, z, rng=rng)
        self.roles.activate(None)
        return float(norms.max())

    # ------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """A checkpoint of the run as it is (the main process writes it)."""
        cfg, unet = self.cfg, self.roles.unet
        state = {
            "step": self.step,
            "mixed_precision": self.precision,
            "world_size": self.world,
            "global_batch": cfg.global_batch(self.world),
            "opt_generator": self.opt_generator.state_dict(),
            "opt_fake": self.opt_fake.state_dict(),
            "scaler_generator": self.scaler_generator.state_dict(),
            "scaler_fake": self.scaler_fake.state_dict(),
            "jacobian_norm": self.jacobian_norm,
            "error_table": self.error_table,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        adapters = {name: adapter_state_dict(unet, name) for name in (GENERATOR, FAKE_SCORE)}
        if self.ema is not None:
            with self.exported_weights():
                adapters[ckpt.GENERATOR_EMA] = adapter_state_dict(unet, GENERATOR)
        return ckpt.save_checkpoint(cfg.output, self.step, adapters, state, keep=cfg.keep_checkpoints,
                                    metadata={"step": str(self.step), "teacher": cfg.teacher,
                                              "mixed_precision": self.precision})

    def resume(self, accelerator) -> None:
        """Continue from the newest intact checkpoint (the main process picks it, every process loads it: the run
        folder must be on storage all processes see), or start at 0; either way the log is cut to match."""
        from accelerate.utils import broadcast_object_list

        cfg, world = self.cfg, self.world
        run_dir = Path(cfg.output)
        needed = (GENERATOR, FAKE_SCORE) + ((ckpt.GENERATOR_EMA,) if self.ema is not None else ())

        def pick():
            found = ckpt.latest_intact_checkpoint(run_dir, needed)
            if found and found[2].get("global_batch", cfg.global_batch(world)) != cfg.global_batch(world):
                raise UserError(f"{found[0]} was made at a global batch of {found[2]['global_batch']}, config.json "
                                f"says {cfg.global_batch(world)}: restore the run's config.json, or start over with "
                                "--overwrite")
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
                raise UserError(f"process {accelerator.process_index} cannot read {path} ({err}): the run folder "
                                "must be on storage every process sees") from err

        latest, adapters, state = agreed(accelerator, read)
        unet = self.roles.unet
        if self.ema is not None:  # the EMA goes through the generator adapter first, then the raw weights replace it
            load_adapter_state_dict(unet, GENERATOR, adapters.pop(ckpt.GENERATOR_EMA))
            self.ema = [p.detach().clone() for p in self.generator_params()]
        for name in (GENERATOR, FAKE_SCORE):
            load_adapter_state_dict(unet, name, adapters[name])
        self.opt_generator.load_state_dict(state["opt_generator"])
        self.opt_fake.load_state_dict(state["opt_fake"])
        if state.get("scaler_generator"):
            self.scaler_generator.load_state_dict(state["scaler_generator"])
            self.scaler_fake.load_state_dict(state["scaler_fake"])
        torch.set_rng_state(state["torch_rng"])
        self.jacobian_norm, self.error_table = state.get("jacobian_norm"), state.get("error_table")
        self.step = state["step"]
        if accelerator.is_main_process:
            print(f"resuming from {latest} (iteration {self.step})")
