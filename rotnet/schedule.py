"""Learning-rate schedule: (epoch, lr) step table, optional linear scaling and warm-up. Evaluated
per step from a float epoch, so a mid-epoch resume lands on the uninterrupted run's lr."""
from __future__ import annotations

from rotnet.config import ConfigError


class StepSchedule:
    """lr(epoch_float) from a table [[epoch, lr], ...] starting at epoch 0, times `scale`, ramped
    linearly over `warmup_epochs` (Goyal et al. 2017). A bad table is a ConfigError naming `name`."""

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
    """Whether a periodic pass runs after 0-based `epoch`: every `every` epochs (0: never), and the last."""
    done = epoch + 1
    return every > 0 and (done % every == 0 or done == epochs)
