"""rotnet.epoch_log: window scalars, epoch sums over windows, the finite-loss check."""
import math
from types import SimpleNamespace

import pytest
import torch

from rotnet.config import Config
from rotnet.distributed import DistInfo
from rotnet.epoch_log import DivergedError, EpochLog


class Logger:
    def __init__(self):
        self.steps = []

    def step(self, global_step, n_steps, scalars):
        self.steps.append((global_step, n_steps, scalars))


def fake_run() -> SimpleNamespace:
    return SimpleNamespace(cfg=Config(), info=DistInfo(), logger=Logger(), step=0, checkpoint="none yet")


def batch(loss: float, correct: int, n: int = 8, k: int = 4):
    """(loss (), logits (n, k), labels (n,)) with `correct` rows predicting their label."""
    labels = torch.arange(n) % k
    right = torch.nn.functional.one_hot(labels, k).float()
    logits = torch.cat([right[:correct], right[correct:].roll(1, dims=1)])
    return torch.tensor(loss), logits, labels


def test_windows_log_their_own_means_and_the_epoch_sums_them():
    run = fake_run()
    epoch_log = EpochLog(run, epoch=2, steps=10)
    for i, (loss, correct) in enumerate([(1.0, 8), (3.0, 4), (2.0, 2)]):
        epoch_log.batch_arrived()
        epoch_log.add(*batch(loss, correct))
        run.step += 1
        if i in (1, 2):                         # windows: steps 0-1, then step 2
            epoch_log.close_window(i, lr=0.1)
        epoch_log.step_done()
    (s1, n1, w1), (s2, n2, w2) = run.logger.steps
    assert (s1, n1, s2, n2) == (2, 2, 3, 1)
    assert w1["loss"] == pytest.approx(2.0) and w1["rot_acc"] == pytest.approx(12 / 16) and w1["lr"] == 0.1
    assert w2["loss"] == pytest.approx(2.0) and w2["rot_acc"] == pytest.approx(2 / 8)
    stats = epoch_log.epoch_stats(2, start_step=0, lr=0.1, complete=True)
    assert stats["loss"] == pytest.approx(2.0) and stats["rot_acc"] == pytest.approx(14 / 24)
    assert (stats["epoch"], stats["step"], stats["steps"], stats["rotated_images"]) == (2, 3, 3, 24)
    assert stats["complete"] and 0 <= stats["data_wait"] <= 1


def test_a_non_finite_loss_stops_at_the_window_naming_where():
    epoch_log = EpochLog(fake_run(), epoch=1, steps=10)
    epoch_log.add(*batch(math.nan, 0))
    with pytest.raises(DivergedError, match=r"loss is nan at epoch 1 step 4 \(lr 0.1\); the last good "
                                            "checkpoint is none yet"):
        epoch_log.close_window(4, lr=0.1)


def test_an_epoch_without_steps_reports_zeros():
    stats = EpochLog(fake_run(), epoch=0, steps=5).epoch_stats(4, start_step=5, lr=0.1, complete=True)
    assert (stats["loss"], stats["rot_acc"], stats["rotated_images"], stats["steps"]) == (0.0, 0.0, 0, 0)
