"""Learning-rate schedule: (epoch, lr) step table, optional linear scaling and warm-up, and the SGD it
drives. Evaluated per step from a float epoch, so a mid-epoch resume lands on the uninterrupted run's lr."""
from __future__ import annotations

import torch

from rotnet.cli import UsageError


class StepSchedule:
    """lr(epoch_float) from a table [[epoch, lr], ...] starting at epoch 0 (checked when the config
    loads: rotnet.config.check_schedule), times `scale`, ramped linearly over `warmup_epochs` (Goyal et
    al. 2017)."""

    def __init__(self, table: list[list[float]], scale: float = 1.0, warmup_epochs: float = 0.0):
        self.scale = scale
        self.table = [(float(e), float(lr) * scale) for e, lr in table]
        self.warmup_epochs = warmup_epochs

    def __call__(self, epoch: float) -> float:
        lr = next(lr for e, lr in reversed(self.table) if epoch >= e)
        if epoch < self.warmup_epochs:
            lr *= (epoch + 1e-3) / self.warmup_epochs
        return lr


def stretch_schedule(table: list[list[float]], from_epochs: int, to_epochs: int,
                     lr: float | None) -> list[list[float]]:
    """(epoch, lr) table for `to_epochs` epochs; lr given: scaled so the first entry equals it.
    Milestones are not rounded: a 1-2 epoch run would collapse every stage onto epoch 0."""
    if lr is not None and table[0][1] == 0:   # epochs >= 1 and lr > 0: probe.epochs and --epochs check
        raise UsageError(f"--lr={lr} scales probe.schedule by --lr / its first lr, which is 0: set "
                         "probe.schedule itself")
    f = to_epochs / from_epochs
    g = 1.0 if lr is None else lr / table[0][1]
    return [[round(e * f, 4), float(f"{v * g:.6g}")] for e, v in table]


def build_optimizer(params, lr: float, hp) -> torch.optim.SGD:
    """SGD with hp's momentum, nesterov and weight_decay (cfg.optim or cfg.probe); fused where the
    torch build has it for the device, else foreach (the same update)."""
    params = list(params)   # may be a generator: the fallback needs it again
    sgd = dict(lr=lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay)
    try:
        return torch.optim.SGD(params, fused=True, **sgd)
    except (RuntimeError, TypeError):
        return torch.optim.SGD(params, foreach=True, **sgd)


def due_after(epoch: int, every: int, epochs: int) -> bool:
    """Whether a periodic pass runs after 0-based `epoch`: every `every` epochs (0: never), and the last."""
    done = epoch + 1
    return every > 0 and (done % every == 0 or done == epochs)
