"""Where an iteration's time goes: seconds in UNet forwards and backwards, apart from everything else."""

from __future__ import annotations

import time

import torch
from torch import Tensor


class UNetClock:
    """Times each UNet call's forward, and its backward from the gradient reaching the output to it reaching
    the input (whenever autograd runs it: `loss.backward()`, the E-step's z-VJP, a checkpointed recompute).

    On CUDA every stamp synchronises the device, so the split is true but the run is a little slower: it is
    only installed with `--profile`.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.forward_s = 0.0
        self.backward_s = 0.0
        self.backward_rows = 0
        self._anchor = torch.zeros((), device=device, requires_grad=True)  # makes the input stamp run in backward
        self._backward_start = 0.0

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def time(self, fn, x: Tensor, *args) -> Tensor:
        """fn(x, *args), timed; x is the batch (its first dimension is counted as rows)."""
        if torch.is_grad_enabled():
            x = _Stamp.apply(x, self._anchor, self._end_backward, x.shape[0])
        start = self.now()
        out = fn(x, *args)
        self.forward_s += self.now() - start
        if out.requires_grad:
            out = _Stamp.apply(out, None, self._start_backward, 0)
        return out

    def _start_backward(self, rows: int) -> None:
        self._backward_start = self.now()

    def _end_backward(self, rows: int) -> None:
        self.backward_s += self.now() - self._backward_start
        self.backward_rows += rows


class _Stamp(torch.autograd.Function):
    """Identity in forward; calls `hook(rows)` when its gradient is computed."""

    @staticmethod
    def forward(ctx, x, anchor, hook, rows):
        ctx.hook, ctx.rows, ctx.has_anchor = hook, rows, anchor is not None
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.hook(ctx.rows)
        return grad, (torch.zeros((), device=grad.device) if ctx.has_anchor else None), None, None
