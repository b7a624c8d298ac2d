"""One EMD iteration on one process: its inputs drawn up front, the generator update, the fake-score updates."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import DistillConfig
from .emd import Draws, draw, fake_score_step, generator_step, sample_timesteps
from .optim import optimizer_step
from .profiling import UNetClock
from .roles import FAKE_SCORE, adapter_parameters


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


# ---------------------------------------------------------------- one iteration
@dataclass(frozen=True)
class FakeDraws:
    """The randomness of one fake-score update (F1), sample-major like `emd.Draws`."""

    t: torch.Tensor
    eps: torch.Tensor
    z: torch.Tensor | None  # fresh generator inputs; None for the first update, which reuses the E-step's g(z_0)


def draw_fake(cfg: DistillConfig, shape: tuple[int, ...], fresh: bool, rng, device) -> FakeDraws:
    t = sample_timesteps(shape[0], cfg.t_min, cfg.t_max, device, rng)
    eps = torch.randn(shape, generator=rng, device=device)
    return FakeDraws(t, eps, torch.randn(shape, generator=rng, device=device) if fresh else None)


@dataclass(frozen=True)
class Batch:
    """One iteration's inputs on this process, all drawn before any model runs: the prompts' embeddings and
    every random draw, for the whole batch. Micro-batches are row slices of it, so `--grad-accum N` at batch B
    computes the same gradient as one batch of N B (up to float summation order)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    draws: Draws
    fake: list[FakeDraws]

    def micro(self, i: int, size: int) -> slice:
        return slice(i * size, (i + 1) * size)


def make_batch(cfg, settings, prompts, cache, latent_shape, step, rank, world, device) -> Batch:
    rows = cfg.batch_size * cfg.grad_accum
    rng = step_rng(cfg.seed, rank, step, device)
    cond = cache.get(batch_prompts(prompts, cfg.seed, step, rank, world, rows), device=device)
    shape = (rows, *latent_shape)
    draws = draw(settings, shape, rng, device)
    fake = [draw_fake(cfg, shape, update > 0, rng, device) for update in range(cfg.fake_updates)]
    return Batch(cond, cache.null_embedding(device=device).expand_as(cond), draws, fake)


def generator_update(run, cfg, settings, batch: Batch, alphas_cumprod, autocast, world: int, stats) -> list:
    """E-step and M-step (M1) over the micro-batches, then one optimizer step; returns each micro-batch's
    g(z_0) for the first fake-score update."""
    roles, size, x0_samples = run.roles, cfg.batch_size, []
    for i in range(cfg.grad_accum):
        rows = batch.micro(i, size)
        generator, teacher_eps, fake_eps = roles.bind(batch.cond[rows], batch.uncond[rows])
        with autocast():
            g = generator_step(generator, teacher_eps, fake_eps, alphas_cumprod,
                               batch.draws.rows(rows.start, rows.stop), settings)
        run.scaler_generator.scale(g.loss / cfg.grad_accum).backward()
        x0_samples.append(g.x0_sample)
        stats["loss_generator"] += g.loss.item() / cfg.grad_accum
        stats["weight"] += g.weight_mean / cfg.grad_accum
        stats["eps_tilde_rms"] += g.eps_tilde_rms / cfg.grad_accum
    stats["grad_norm_generator"] = optimizer_step(run.opt_generator, run.scaler_generator, run.generator_params(),
                                                  cfg.max_grad_norm, world)
    return x0_samples


def fake_score_updates(run, cfg, batch: Batch, x0_samples, alphas_cumprod, autocast, world: int, stats):
    """`fake_updates` steps of (F1): the first on the E-step's g(z_0), further ones on fresh generator samples."""
    roles, size = run.roles, cfg.batch_size
    fake_params = adapter_parameters(roles.unet, FAKE_SCORE)
    for update, fake in enumerate(batch.fake):
        for i in range(cfg.grad_accum):
            rows = batch.micro(i, size)
            generator, _, fake_eps = roles.bind(batch.cond[rows], batch.uncond[rows])
            x0 = x0_samples[i]
            if fake.z is not None:
                with torch.no_grad(), autocast():
                    x0 = generator(fake.z[rows])
            with autocast():
                loss_f = fake_score_step(fake_eps, x0, fake.t[rows], fake.eps[rows], alphas_cumprod)
            run.scaler_fake.scale(loss_f / (cfg.grad_accum * cfg.fake_updates)).backward()
            stats["loss_fake"] += loss_f.item() / (cfg.grad_accum * cfg.fake_updates)
        stats["grad_norm_fake"] = optimizer_step(run.opt_fake, run.scaler_fake, fake_params, cfg.max_grad_norm, world)
    roles.activate(None)


def finite_iteration(stats: dict, fp16: bool) -> bool:
    """Whether an iteration was sound. Under fp16 an overflowing gradient is the loss scaler's business (it
    skips the step and backs off), so only the losses themselves count."""
    keys = ("loss_generator", "loss_fake") if fp16 else ("grad_norm_generator", "grad_norm_fake")
    return all(math.isfinite(stats[k]) for k in keys)


@dataclass(frozen=True)
class Window:
    """Counters at the start of a log window, to report rates and the time split over it."""

    tic: float
    step: int
    rows: int
    forward_s: float = 0.0
    backward_s: float = 0.0
    backward_rows: int = 0

    @classmethod
    def start(cls, run, clock: UNetClock | None) -> Window:
        if clock is None:
            return cls(time.perf_counter(), run.step, run.roles.unet_rows)
        return cls(clock.now(), run.step, run.roles.unet_rows, clock.forward_s, clock.backward_s, clock.backward_rows)

    def read(self, run, clock: UNetClock | None, device: torch.device) -> dict:
        steps = max(run.step - self.step, 1)
        elapsed = (clock.now() if clock else time.perf_counter()) - self.tic
        out = {"it_per_s": steps / elapsed, "unet_rows_per_it": (run.roles.unet_rows - self.rows) / steps}
        if clock is not None:
            forward, backward = (clock.forward_s - self.forward_s) / steps, (clock.backward_s - self.backward_s) / steps
            out.update(unet_forward_s=forward, unet_backward_s=backward, other_s=elapsed / steps - forward - backward,
                       unet_backward_rows_per_it=(clock.backward_rows - self.backward_rows) / steps)
        if device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out
