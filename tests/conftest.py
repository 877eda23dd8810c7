"""Fixtures shared across the test packages: the tiny trained run, and what an entry point run in
this process (tests/tiny_run.py) leaves behind put back after every test."""
import errno
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import rotnet.atomic
from tests.tiny_run import TINY_RUN, train_in_process


@pytest.fixture(autouse=True)
def _entry_point_state():
    """Restore what a main() changes for its process: setup_logging's handlers on the "rotnet" logger
    (bound to this test's captured stderr, closed afterwards) and the stop-signal handlers."""
    log = logging.getLogger("rotnet")
    saved = log.handlers[:], log.level, log.propagate
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for h in log.handlers:
        if h not in saved[0]:
            h.close()
    log.handlers[:], log.level, log.propagate = saved
    for s, h in handlers.items():
        signal.signal(s, h)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): the tensors are tiny, and on a CPU
    shared with other jobs every multi-threaded op would wait for a descheduled thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_only(monkeypatch):
    """What CUDA_VISIBLE_DEVICES="" is to a subprocess, for a run in this process: the CPU path (gloo,
    bit-exact fp32) on a machine with a GPU too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The built-in sample set at its smallest: 10 classes x (2 train, 2 val) JPEGs; at 8 originals
    per step, 2 steps per epoch."""
    from pipelines.sample_data import ensure_sample_data

    return ensure_sample_data(seed=0, cache_dir=tmp_path_factory.mktemp("sample"), per_class_train=2,
                              per_class_val=2)


@pytest.fixture(scope="session")
def trained_run(sample_data, tmp_path_factory):
    """ONE tiny pretraining run (configs/sample.yaml at TINY_RUN sizes, 2 epochs), trained once per
    session and read by the train, eval, export and visualize tests: (run folder, its stderr).
    Read it only: a test that writes into a run folder works on a copy (`copied_run`)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    stderr = train_in_process(["--config", "configs/sample.yaml", f"data.root={sample_data}", *TINY_RUN,
                               "optim.epochs=2", f"train.output_dir={out}"])
    return out, stderr


@pytest.fixture
def copied_run(trained_run, tmp_path) -> Path:
    """A copy of the shared trained run that the test may write into (resume it, eval into it)."""
    return Path(shutil.copytree(trained_run[0], tmp_path / "run"))


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 1 MiB tmpfs (a full disk to write into), unmounted after; skipped where mounting is not
    permitted (not root, no CAP_SYS_ADMIN): the fault-injected tests cover the same code."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(params=["injected", "tmpfs"])
def full_disk(request, tmp_path, monkeypatch) -> Path:
    """A folder on a full disk: no file written through rotnet.atomic fits in it. injected: the fsync
    of a file in it fails with ENOSPC (as NFS reports a full disk); tmpfs: `small_disk` filled up
    (a hidden `.filler` file takes its space)."""
    if request.param == "tmpfs":
        folder = request.getfixturevalue("small_disk")
        fd = os.open(folder / ".filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        return folder
    folder = tmp_path / "full"
    folder.mkdir()
    fsync = rotnet.atomic._fsync

    def fails_when_full(path: str) -> None:
        if os.path.isfile(path) and os.path.abspath(path).startswith(f"{folder}{os.sep}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(path)
    monkeypatch.setattr(rotnet.atomic, "_fsync", fails_when_full)
    return folder
