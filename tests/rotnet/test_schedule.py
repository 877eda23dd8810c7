import pytest

from rotnet.cli import UsageError
from rotnet.schedule import StepSchedule, due_after, stretch_schedule


def test_step_table():
    s = StepSchedule([[0, 0.1], [30, 0.02], [60, 0.004]])
    assert s(0) == 0.1 and s(29.99) == 0.1 and s(30) == 0.02 and s(99) == 0.004


def test_scale_and_warmup():
    s = StepSchedule([[0, 0.1]], scale=8.0, warmup_epochs=5)
    assert s(0) < 0.01 and s(2.5) == pytest.approx(0.4, rel=1e-3) and s(5) == pytest.approx(0.8)


def test_stretch_keeps_ratios_and_refuses_an_lr_it_cannot_scale():
    table = [[0, 0.01], [5, 0.002], [15, 0.0004]]
    assert stretch_schedule(table, 35, 70, None) == [[0, 0.01], [10, 0.002], [30, 0.0004]]
    assert stretch_schedule(table, 35, 35, 0.1) == [[0, 0.1], [5, 0.02], [15, 0.004]]
    with pytest.raises(UsageError, match="its first lr, which is 0"):   # was a ZeroDivisionError
        stretch_schedule([[0, 0.0], [5, 0.002]], 35, 35, 0.1)


def test_due_after_every_n_and_the_last_epoch():
    assert [e for e in range(10) if due_after(e, 4, 10)] == [3, 7, 9]   # the last epoch always
    assert [e for e in range(3) if due_after(e, 1, 3)] == [0, 1, 2]
    assert not any(due_after(e, 0, 5) for e in range(5))                # 0 = never
