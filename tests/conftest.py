"""Fixtures shared across the test packages."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): the tensors are tiny, and on a CPU
    shared with other jobs every multi-threaded op would wait for a descheduled thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
