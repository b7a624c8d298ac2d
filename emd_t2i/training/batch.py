"""One iteration's inputs, all drawn before any model runs: every sample's prompt and random draws follow from
(seed, iteration, its place in the global batch)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from emd_t2i.emd import Draws, draw, sample_timesteps
from emd_t2i.training.config import DistillConfig


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
