"""What a run reports: the means over processes, rates and memory over a log window, and where an iteration's time
goes (seconds in UNet forwards and backwards, apart from everything else)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

MEAN_STATS = ("loss_generator", "loss_fake", "weight", "eps_tilde_rms")  # per-process means of equal-sized batches


def global_means(stats: dict, world: int, device) -> None:
    """Turn this process's means into the global batch's (gradient norms already are: they follow the all-reduce),
    so the log and the non-finite check read the same numbers on every process and at any split."""
    if world == 1:
        return
    values = torch.tensor([stats[k] for k in MEAN_STATS], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    stats.update(zip(MEAN_STATS, (values / world).tolist()))


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
