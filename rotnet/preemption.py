"""Graceful stop on SIGTERM / SIGUSR1: finish the step, checkpoint, exit for requeue.

SLURM sends SIGUSR1 `--signal=USR1@120` seconds before the time limit (and SIGTERM on
preemption/scancel); torchrun forwards SIGTERM to its workers. The handler only sets a
flag: all ranks agree on it through one tiny all-reduce per step, so every rank stops
after the same step and rank 0's checkpoint is consistent.
"""
from __future__ import annotations

import signal

import torch

from rotnet.distributed import DistInfo, all_reduce_sum

# Exit code meaning "stopped on purpose, checkpoint written, please requeue": the sbatch
# scripts in slurm/ turn it into `scontrol requeue`. Not 0, so that torchrun and SLURM
# do not mistake a preempted run for a finished one.
REQUEUE_EXIT_CODE = 3


class StopFlag:
    """every: steps between the cross-rank checks. The check is a blocking all-reduce (it
    drains the CUDA queue), so doing it every step would cost GPU/CPU overlap."""

    def __init__(self, info: DistInfo, every: int = 10, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.info = info
        self.every = max(1, every)
        self.received: int | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, step: int) -> bool:
        """True on every rank once any rank got a signal; a collective every `every` steps
        when distributed, so call it on all ranks with the same `step`."""
        if not self.info.distributed:
            return self.received is not None
        if step % self.every:
            return False
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.info.device)
        return bool(all_reduce_sum(flag, self.info).item() > 0)
