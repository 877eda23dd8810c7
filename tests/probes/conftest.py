"""One intra-op thread for the probe tests (the `one_thread` fixture of tests/conftest.py)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
