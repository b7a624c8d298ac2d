"""One EMD iteration on one process: its inputs drawn up front, the generator update, the fake-score updates."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import DistillConfig
from .emd import (
    TIMESTEP_BINS,
    Draws,
    bin_sums,
    draw,
    fake_score_step,
    generator_jacobian_norm,
    generator_step,
    sample_timesteps,
    timestep_bin,
    update_error_table,
)
from .optim import optimizer_step
from .profiling import UNetClock


# ---------------------------------------------------------------- randomness and data order
# A run's math depends on the global batch, never on how it is split: every sample's prompt and random draws are
# a function of (seed, step, its position in the global batch). So N processes at batch B, one process with
# `--grad-accum N` and one process at batch N B compute the same iteration (tests/test_memory_settings.py,
# tests/test_multiprocess.py), and a run may resume on another number of GPUs with the same global batch.
def sample_rng(seed: int, step: int, sample: int) -> torch.Generator:
    """The CPU generator of one sample of one iteration: a resumed run draws exactly what an uninterrupted one does."""
    state = int(np.random.SeedSequence([seed, step, sample]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(state)


def global_rows(cfg: DistillConfig, rank: int) -> range:
    """This process's positions in the global batch of world x grad_accum x batch_size samples."""
    rows = cfg.batch_size * cfg.grad_accum
    return range(rank * rows, (rank + 1) * rows)


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_prompts(prompts, seed: int, step: int, rows: range, global_batch: int) -> list[str]:
    """The prompts at positions `rows` of one step's global batch: consecutive slices of per-epoch permutations,
    so every prompt is seen once per epoch; the data position is a function of the step (nothing to checkpoint)."""
    n = len(prompts)
    out = []
    for row in rows:
        epoch, index = divmod(step * global_batch + row, n)
        out.append(prompts[int(_epoch_order(seed, epoch, n)[index])])
    return out


# ---------------------------------------------------------------- one iteration
@dataclass(frozen=True)
class FakeDraws:
    """The randomness of one fake-score update (F1), sample-major like `emd.Draws`."""

    t: torch.Tensor
    eps: torch.Tensor
    z: torch.Tensor | None  # fresh generator inputs; None for the first update, which reuses the E-step's g(z_0)


def draw_fake(cfg: DistillConfig, shape: tuple[int, ...], fresh: bool, rng) -> FakeDraws:
    t = sample_timesteps(shape[0], cfg.t_min, cfg.t_max, "cpu", rng)
    eps = torch.randn(shape, generator=rng)
    return FakeDraws(t, eps, torch.randn(shape, generator=rng) if fresh else None)


def _stack(parts: list, device):
    """Concatenate per-sample draws (dataclasses of (1, ...) or (K, 1, ...) tensors) along the sample axis."""
    first = parts[0]
    fields = {}
    for name in first.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        if values[0] is None:
            fields[name] = None
        else:
            dim = 1 if name in ("n", "m") else 0  # the chain's noise is (K, B, ...)
            fields[name] = torch.cat(values, dim=dim).to(device)
    return type(first)(**fields)


@dataclass(frozen=True)
class Batch:
    """One iteration's inputs on this process, all drawn before any model runs: the prompts' embeddings and
    every random draw, for all its rows. Micro-batches are row slices of it."""

    cond: torch.Tensor
    uncond: torch.Tensor
    draws: Draws
    fake: list[FakeDraws]

    def micro(self, i: int, size: int) -> slice:
        return slice(i * size, (i + 1) * size)


def make_batch(cfg, settings, prompts, cache, latent_shape, step, rank, world, device) -> Batch:
    rows = global_rows(cfg, rank)
    cond = cache.get(batch_prompts(prompts, cfg.seed, step, rows, len(rows) * world), device=device)
    draws, fakes = [], []
    for row in rows:  # a few ms of CPU randomness per sample; the same whatever the split
        rng = sample_rng(cfg.seed, step, row)
        draws.append(draw(settings, (1, *latent_shape), rng))
        fakes.append([draw_fake(cfg, (1, *latent_shape), update > 0, rng) for update in range(cfg.fake_updates)])
    fake = [_stack([f[update] for f in fakes], device) for update in range(cfg.fake_updates)]
    return Batch(cond, cache.null_embedding(device=device).expand_as(cond), _stack(draws, device), fake)


def generator_update(run, cfg, settings, batch: Batch, alphas_cumprod, autocast, world: int, stats) -> list:
    """E-step and M-step (M1) over the micro-batches, then one optimizer step; returns each micro-batch's
    g(z_0) for the first fake-score update."""
    roles, size, x0_samples = run.roles, cfg.batch_size, []
    sums = counts = torch.zeros(TIMESTEP_BINS, dtype=torch.float64)
    for i in range(cfg.grad_accum):
        rows = batch.micro(i, size)
        generator, teacher_eps, fake_eps = roles.bind(batch.cond[rows], batch.uncond[rows])
        draws = batch.draws.rows(rows.start, rows.stop)
        with autocast():
            g = generator_step(generator, teacher_eps, fake_eps, alphas_cumprod, draws, settings,
                               jacobian_norm=run.jacobian_norm, error_table=run.error_table)
        run.scaler_generator.scale(g.loss / cfg.grad_accum).backward()
        x0_samples.append(g.x0_sample)
        stats["loss_generator"] += g.loss.item() / cfg.grad_accum
        stats["weight"] += g.weight_mean / cfg.grad_accum
        stats["eps_tilde_rms"] += g.eps_tilde_rms / cfg.grad_accum
        if settings.weighting == "dmd-t":
            batch_sums, batch_counts = bin_sums(timestep_bin(draws.t, settings.t_min, settings.t_max), g.error)
            sums, counts = sums + batch_sums, counts + batch_counts
    stats["grad_norm_generator"] = optimizer_step(run.opt_generator, run.scaler_generator, run.generator_params(),
                                                  cfg.max_grad_norm, world)
    if settings.weighting == "dmd-t":  # the table is updated with the whole global batch, after its step
        if world > 1:
            both = torch.stack([sums, counts]).to(batch.cond.device)
            torch.distributed.all_reduce(both)
            sums, counts = both.cpu()
        table = run.error_table if run.error_table is not None else torch.full_like(sums, float("nan"))
        run.error_table = update_error_table(table, sums, counts)
    return x0_samples


JACOBIAN_SAMPLES = 4  # generator samples whose |J| is measured (the largest is used)


def measure_jacobian_norm(run, cfg, prompts, cache, latent_shape, world: int, device, autocast) -> float:
    """The generator's Jacobian norm |J| (emd.generator_jacobian_norm) at z ~ N(0, I) for the first prompts of this
    step's global batch: the same inputs on every process, so every process gets the same number."""
    rows = range(JACOBIAN_SAMPLES)
    cond = cache.get(batch_prompts(prompts, cfg.seed, run.step, rows, cfg.batch_size * cfg.grad_accum * world),
                     device=device)
    rng = sample_rng(cfg.seed, run.step, 2**32)  # a stream no sample of the batch uses
    z = torch.randn((len(rows), *latent_shape), generator=rng).to(device)
    generator = functools.partial(run.roles.generator, cond=cond)
    with autocast():
        norms = generator_jacobian_norm(generator, z, rng=rng)
    run.roles.activate(None)
    return float(norms.max())


def fake_score_updates(run, cfg, batch: Batch, x0_samples, alphas_cumprod, autocast, world: int, stats):
    """`fake_updates` steps of (F1): the first on the E-step's g(z_0), further ones on fresh generator samples.
    Logs the mean loss and the mean gradient norm over the updates."""
    roles, size, norms = run.roles, cfg.batch_size, []
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
        norms.append(optimizer_step(run.opt_fake, run.scaler_fake, run.fake_params(), cfg.max_grad_norm, world))
    stats["grad_norm_fake"] = sum(norms) / len(norms)  # inf or nan if any update was skipped
    roles.activate(None)


MEAN_STATS = ("loss_generator", "loss_fake", "weight", "eps_tilde_rms")  # per-process means of equal-sized batches


def global_means(stats: dict, world: int, device) -> None:
    """Turn this process's means into the global batch's (gradient norms already are: they follow the all-reduce),
    so the log and the non-finite check read the same numbers on every process and at any split."""
    if world == 1:
        return
    values = torch.tensor([stats[k] for k in MEAN_STATS], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    stats.update(zip(MEAN_STATS, (values / world).tolist()))


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
