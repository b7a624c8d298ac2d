"""One optimizer step of a role (average across processes, unscale under fp16, clip, step), the learning-rate
schedule, and the exponential moving average of the generator's weights."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def make_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler:
    """A dynamic loss scaler under fp16 (fp16 gradients underflow without one); a no-op otherwise.

    One per optimizer: the generator and the fake score step at different times, and each scaler's
    unscale -> step -> update cycle must close before its next backward.
    """
    return torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """All-reduce (mean) LoRA gradients across processes. The UNet is not wrapped in DDP: its forwards use a
    different parameter subset per role and several forwards precede one backward, which DDP's reducer does
    not allow; one explicit all-reduce per optimizer step is equivalent and simpler."""
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    assert len(grads) == len(params), "every LoRA weight of the role being trained must have a gradient"
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def optimizer_step(optimizer, scaler: torch.amp.GradScaler, params, max_norm: float, world: int) -> float:
    """Average, unscale, clip and step; returns the gradient norm (inf or nan when the step was skipped).

    The gradients are averaged while still scaled, so an overflow on any rank reaches every rank and all skip
    together. Under fp16 the scaler skips a non-finite step itself and backs its scale off (`update`); without
    a scaler a non-finite norm skips the step here.
    """
    average_gradients(params, world)
    scaler.unscale_(optimizer)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def lr_scale(schedule: str, step: int, iterations: int, warmup: int = 0) -> float:
    """The factor on both base learning rates at a step: a linear warmup over `warmup` steps, then 1
    (constant) or a cosine from 1 to 0 over the rest of the run. A function of the step alone, so a resumed
    run continues the same curve with nothing to checkpoint."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(step - warmup, iterations - warmup) / max(iterations - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay at a step, warmed up as diffusers' EMAModel does, so the first weights fade quickly."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params."""
    for e, p in zip(ema, params):
        e.lerp_(p.detach(), 1 - decay)
