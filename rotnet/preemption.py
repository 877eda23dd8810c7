"""Graceful stop on SIGTERM / SIGUSR1 (SLURM's `--signal=USR1@120`, scancel, torchrun): finish the
step, checkpoint, exit for requeue. The handler only sets a flag; ranks agree on it at the end of a
logging window, so all stop after the same step. The trainer then raises `Preempted`.
"""
from __future__ import annotations

import signal

import torch

from rotnet.distributed import DistInfo, all_reduce_sum

# "Stopped, checkpoint written, please requeue" (slurm/ scripts run `scontrol requeue`); not 0.
REQUEUE_EXIT_CODE = 3


class Preempted(Exception):
    """A stop signal ended training after a step; (epoch, epoch_step) is where the run resumes."""

    def __init__(self, epoch: int, epoch_step: int):
        super().__init__(f"stopped at epoch {epoch} step {epoch_step}")
        self.epoch, self.epoch_step = epoch, epoch_step


class StopFlag:
    """Whether any rank received a stop signal (SIGTERM, SIGUSR1 by default)."""

    def __init__(self, info: DistInfo, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.info = info
        self.received: int | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, window_end: bool) -> bool:
        """True on every rank once any rank got a signal. Distributed, the all-reduce blocks, so it
        runs only at `window_end` (False between)."""
        if not self.info.distributed:
            return self.received is not None
        if not window_end:
            return False
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.info.device)
        return bool(all_reduce_sum(flag, self.info).item() > 0)
