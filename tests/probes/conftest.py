"""One intra-op thread for the probe tests: the tensors are tiny, and on a CPU shared with
other jobs every multi-threaded op would wait for a descheduled thread."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
