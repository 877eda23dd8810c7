"""rotnet.preemption: the stop flag a signal sets, and where training stopped."""
import os
import signal

from rotnet.distributed import DistInfo
from rotnet.preemption import Preempted, StopFlag


def test_one_process_stops_after_any_step_once_signalled():
    before = signal.getsignal(signal.SIGUSR1)
    try:
        flag = StopFlag(DistInfo(), signals=(signal.SIGUSR1,))
        assert not flag.should_stop(window_end=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.should_stop(window_end=False) and flag.should_stop(window_end=True)
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_preempted_carries_the_resume_point():
    stop = Preempted(3, 17)
    assert (stop.epoch, stop.epoch_step) == (3, 17) and "epoch 3 step 17" in str(stop)
