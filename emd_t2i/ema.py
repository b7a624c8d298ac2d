"""Exponential moving average of weights, as the distilled generator and the toy teacher both keep one."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay at a step, warmed up as diffusers' EMAModel does, so the first weights fade quickly."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params."""
    for e, p in zip(ema, params):
        e.lerp_(p.detach(), 1 - decay)
