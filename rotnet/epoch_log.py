"""An epoch's log: each step's loss and accuracy measured into a window, the window reported to the
run's logger, the epoch's sums, with their timers.

A step never waits for the device: loss and correct count add into a float64 (2,) tensor on it;
the host syncs once per logging window, in `close_window`. train.train_one_epoch shows the calls.
"""
from __future__ import annotations

import math
import time

import torch

from rotnet.cli import InputError
from rotnet.distributed import all_reduce_sum


class DivergedError(InputError):
    """The loss or the weights became non-finite; the message names where, the lr, and the last good
    checkpoint, which a rerun resumes from (non-finite weights are never saved)."""


def diverged(what: str, run, epoch: int, step: int, lr: float) -> DivergedError:
    """The one message for a diverged run: `what` ('loss is nan') at epoch/step, lr, last good checkpoint."""
    return DivergedError(f"training diverged: {what} at epoch {epoch} step {step} (lr {lr:.4g}); the last "
                         f"good checkpoint is {run.checkpoint}, and a rerun resumes from it: lower the lr "
                         "(optim.schedule) or use train.precision=fp32 to find the cause")


class EpochLog:
    """One epoch's window and sums for `run` (train.Run); `close_window` logs each window to
    run.logger. `steps`: the epoch's length."""

    def __init__(self, run, epoch: int, steps: int):
        self.run, self.epoch, self.steps = run, epoch, steps
        data = run.cfg.data
        self.rotated_per_image = 1 if data.rotation_mode == "one_random" else len(data.rotations)
        self.window = torch.zeros(2, device=run.info.device, dtype=torch.float64)   # loss*n, correct
        self.window_n = self.window_steps = 0
        self.window_data = self.data_time = 0.0
        self.sums = [0.0, 0.0, 0]              # the epoch's loss*n, correct, n over closed windows
        self.t_epoch = self.t_window = self.t_end = time.perf_counter()

    def batch_arrived(self) -> None:
        self.window_data += time.perf_counter() - self.t_end

    def step_done(self) -> None:
        self.t_end = time.perf_counter()

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One step: mean loss (), logits (B, K), labels (B,). Device ops only."""
        n = labels.numel()
        self.window += torch.stack([loss.detach().double() * n, (logits.argmax(1) == labels).sum().double()])
        self.window_n += n
        self.window_steps += 1

    def close_window(self, i: int, lr: float) -> None:
        """End the window after step `i`: the one host sync, finite-loss check, scalars to the logger.
        A non-finite loss on any rank stops every rank here (no rank waits in a collective for one gone)."""
        nonfinite = all_reduce_sum((~self.window[:1].isfinite()).double(), self.run.info)
        loss_sum, correct, stop = torch.cat([self.window, nonfinite]).tolist()
        n, dt = self.window_n, time.perf_counter() - self.t_window
        if stop:
            here = f"loss is {loss_sum / n}"
            raise diverged(here if not math.isfinite(loss_sum) else "loss is not finite on another rank",
                           self.run, self.epoch, i, lr)
        world = self.run.info.world_size
        self.run.logger.step(self.run.step, self.window_steps, {
            "loss": loss_sum / n, "rot_acc": correct / n, "lr": lr,
            "img/s": n * world / self.rotated_per_image / dt, "rot_img/s": n * world / dt,
            "data_wait": self.window_data / dt,
            "eta_min": (self.steps - i - 1) * dt / self.window_steps / 60})
        self.sums = [s + w for s, w in zip(self.sums, (loss_sum, correct, n))]
        self.data_time += self.window_data
        self.window.zero_()
        self.window_n = self.window_steps = 0
        self.window_data = 0.0
        self.t_window = time.perf_counter()

    def epoch_stats(self, i: int, start_step: int, lr: float, complete: bool) -> dict:
        """The epoch's stats, summed over all ranks (a collective), after its last step `i`."""
        sums = torch.tensor(self.sums, dtype=torch.float64, device=self.run.info.device)
        loss_sum, correct, count = all_reduce_sum(sums, self.run.info).tolist()
        elapsed = time.perf_counter() - self.t_epoch
        return {"epoch": self.epoch, "step": self.run.step, "loss": loss_sum / max(count, 1),
                "rot_acc": correct / max(count, 1), "lr": lr, "rotated_images": int(count),
                "steps": i + 1 - start_step, "time_s": round(elapsed, 2),
                "data_wait": round(self.data_time / max(elapsed, 1e-9), 4), "complete": complete}
