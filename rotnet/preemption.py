"""Graceful stop on SIGTERM / SIGUSR1: finish the step, checkpoint, exit for requeue.

SLURM sends SIGUSR1 `--signal=USR1@120` seconds before the time limit (and SIGTERM on
preemption/scancel); torchrun forwards SIGTERM to its workers. The handler only sets a
flag: all ranks agree on it through one tiny all-reduce at the end of each logging window,
so every rank stops after the same step and rank 0's checkpoint is consistent. The trainer
then raises `Preempted`; its entry point writes the checkpoint and exits with REQUEUE_EXIT_CODE.
"""
from __future__ import annotations

import signal

import torch

from rotnet.distributed import DistInfo, all_reduce_sum

# Exit code meaning "stopped on purpose, checkpoint written, please requeue": the sbatch
# scripts in slurm/ turn it into `scontrol requeue`. Not 0, so that torchrun and SLURM
# do not mistake a preempted run for a finished one.
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
        """True on every rank once any rank got a signal. One process: the flag, after any step.
        Distributed: a blocking all-reduce (it drains the CUDA queue), so only when `window_end`
        (the logging window's sync point) and False between; every rank passes the same value."""
        if not self.info.distributed:
            return self.received is not None
        if not window_end:
            return False
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.info.device)
        return bool(all_reduce_sum(flag, self.info).item() > 0)
