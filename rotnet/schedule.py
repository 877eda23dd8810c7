"""Learning-rate schedule: (epoch, lr) step table, optional linear scaling and warm-up.

Evaluated per optimizer step from a float epoch, so resuming mid-epoch lands on
exactly the same lr as the uninterrupted run.
"""
from __future__ import annotations

from rotnet.config import ConfigError


class StepSchedule:
    """lr(epoch_float) from a table [[epoch, lr], ...] sorted by epoch, starting at epoch 0.

    scale: multiplies every lr (linear scaling rule: global_batch / ref_batch).
    warmup_epochs: lr ramps linearly from ~0 to the table value over the first epochs
    (Goyal et al. 2017: needed when the scaled lr is large).
    A malformed table is a ConfigError naming `name` (the config key it came from).
    """

    def __init__(self, table: list[list[float]], scale: float = 1.0, warmup_epochs: float = 0.0,
                 name: str = "optim.schedule"):
        if not table or any(len(row) != 2 for row in table):
            raise ConfigError(f"{name}: expected a non-empty list of [epoch, lr] pairs, got {table!r}")
        epochs = [row[0] for row in table]
        if epochs[0] != 0 or epochs != sorted(epochs):
            raise ConfigError(f"{name}: epochs must start at 0 and increase, got {epochs}")
        self.scale = scale
        self.table = [(float(e), float(lr) * scale) for e, lr in table]
        self.warmup_epochs = warmup_epochs

    def __call__(self, epoch: float) -> float:
        lr = next(lr for e, lr in reversed(self.table) if epoch >= e)
        if epoch < self.warmup_epochs:
            lr *= (epoch + 1e-3) / self.warmup_epochs
        return lr


def due_after(epoch: int, every: int, epochs: int) -> bool:
    """Whether a periodic pass (held-out rotation, kNN monitor) runs after 0-based epoch `epoch`:
    every `every` epochs and always after the last one, so a run ends with a measurement; 0 = never."""
    done = epoch + 1
    return every > 0 and (done % every == 0 or done == epochs)
