"""Ctrl-C and SIGTERM end a run between iterations, never inside one."""

from __future__ import annotations

import signal
import threading

import torch


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving its last whole iteration; `exit_code` is the shell's 128 + N."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class StopRequest:
    """While active, SIGINT and SIGTERM (what schedulers send before SIGKILL) only set a flag; the loop checks
    it after each iteration, saves, and stops. A second Ctrl-C stops at once (the last checkpoint stays)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration (Ctrl-C again to stop now)", flush=True)

    def agreed(self, world: int, device: torch.device) -> int | None:
        """The signal, if any process got one: all ranks stop after the same iteration."""
        if world == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag) or None
