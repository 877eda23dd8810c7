"""The run lock's holder text (rotnet/runlock.py); two real runs on one folder: tests/test_train_lock.py."""
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from rotnet.cli import InputError
from rotnet.runlock import LOCK, hold_folder, holder, own_folder


def test_an_empty_lock_file_is_read_again_until_its_holder_has_written_it(tmp_path):
    """A run refused between the holder's lock and its write still names the holder."""
    path = tmp_path / LOCK
    path.write_text("")
    later = threading.Timer(0.2, lambda: path.write_text("host h, pid 7, started now\n"))
    later.start()
    try:
        assert holder(path) == "host h, pid 7, started now"
    finally:
        later.cancel()


def test_a_lock_file_left_empty_is_named_as_a_run_still_starting(tmp_path):
    path = tmp_path / LOCK
    path.write_text("")
    start = time.monotonic()
    assert holder(path, wait_s=0.05) == "a run that is still starting (its lock file is empty)"
    assert time.monotonic() - start >= 0.05


def test_a_new_holder_replaces_a_longer_text_whole(tmp_path):
    old = "host a-much-longer-host-name-than-this-one, pid 123456789, started long ago\n"
    (tmp_path / LOCK).write_text(old)
    with hold_folder(tmp_path) as path:
        text = holder(path)
    assert text.startswith("host ") and "long ago" not in text and text.count("pid") == 1


def test_a_reused_lock_file_naming_an_ended_process_here_is_read_again(tmp_path):
    """A run refused between a new holder's lock and its write reads the last holder's text; where
    that names a process of this host that has ended, it waits for the new holder's name."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    last = f"host {socket.gethostname()}, pid {ended.stdout.strip()}, started before\n"
    now = f"host {socket.gethostname()}, pid {os.getpid()}, started now\n"
    path = tmp_path / LOCK
    path.write_text(last)
    later = threading.Timer(0.2, lambda: path.write_text(now))
    later.start()
    try:
        assert holder(path) == now.strip()
    finally:
        later.cancel()
    path.write_text(last)   # never overwritten: named as it is once the wait is over
    assert holder(path, wait_s=0.05) == last.strip()
    path.write_text(now)    # a live process, or another host's: named at once
    start = time.monotonic()
    assert holder(path) == now.strip() and time.monotonic() - start < 0.5
    path.write_text("host another-host, pid 999999999, started then\n")   # liveness unknown there
    assert holder(path) == "host another-host, pid 999999999, started then"


def test_own_folder_makes_the_folder_and_holds_its_lock_unless_told_not_to(tmp_path):
    run = tmp_path / "a" / "run"
    with own_folder(run, "train.output_dir"):
        assert f"pid {os.getpid()}," in (run / LOCK).read_text()   # another process: tests/test_train_lock.py
    with own_folder(tmp_path / "b", "train.output_dir", lock=False):
        assert os.listdir(tmp_path / "b") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"^--out=.*file.*: cannot make this folder"):
        with own_folder(tmp_path / "file", "--out"):
            pass
