"""One run per output folder, with real train.py processes (rotnet/runlock.py): two runs started
together, one is refused naming the other and the other finishes undisturbed; a SIGKILLed holder's
successor takes the folder over at once; under torchrun every rank of a refused (or diverging) run
exits, none waiting for rank 0. In-process checks of the same: tests/test_train_errors.py."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rotnet.runlock import LOCK
from tests.test_train_distributed import (
    PY,
    REPO,
    TORCHRUN,
    load_ckpt,
    make_random_dataset,
    run,
    run_env,
    tail,
    train_args,
)
from tests.test_train_errors import HOLD

pytestmark = pytest.mark.slow
EPOCHS = 30   # 8 images, 2 steps an epoch: long enough that a second run starts while the first lives


def start(out, data, *extra) -> subprocess.Popen:
    return subprocess.Popen([PY, *train_args(out, data, "optim.batch_size_per_gpu=4", "train.monitor_every=0",
                                             f"optim.epochs={EPOCHS}", *extra)],
                            cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def epochs_logged(out) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_runs_on_one_folder_one_is_refused_naming_the_other(tmp_path):
    data, out = make_random_dataset(tmp_path / "data", n=8), tmp_path / "run"
    procs = [start(out, data), start(out, data)]   # together: either may win the lock
    texts = [p.communicate(timeout=240)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], "\n---\n".join(tail(t) for t in texts)
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    refusal = texts[loser].strip().splitlines()
    assert refusal[-1].startswith("error: ") and "Traceback" not in texts[loser], texts[loser]
    assert f"{out} is in use by another run (host " in refusal[-1]
    assert f", pid {procs[winner].pid}, started " in refusal[-1]
    assert epochs_logged(out) == list(range(EPOCHS)), "each epoch once, by the winner"
    assert load_ckpt(out)["epoch"] == EPOCHS
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_a_killed_holder_is_taken_over_at_once(tmp_path):
    data, out = make_random_dataset(tmp_path / "data", n=8), tmp_path / "run"
    first = start(out, data)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)   # what a preempted node or the OOM killer does: no cleanup
        text = first.communicate(timeout=30)[0]
    finally:
        first.kill()
    assert first.returncode == -signal.SIGKILL, tail(text)
    assert (out / LOCK).exists()            # the file stays; the kernel dropped the lock
    p = run([PY, *train_args(out, data, "optim.batch_size_per_gpu=4", "train.monitor_every=0",
                             f"optim.epochs={EPOCHS}")], timeout=240)
    assert "resumed from" in p.stdout + p.stderr
    assert load_ckpt(out)["epoch"] == EPOCHS


def test_every_rank_of_a_refused_torchrun_exits(tmp_path):
    data, out = make_random_dataset(tmp_path / "data", n=16), tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        args = train_args(out, data, "optim.batch_size_per_gpu=4", "optim.epochs=1")
        p = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", *args], timeout=120, check=False)
    finally:
        holder.kill()
        holder.wait()
    text = p.stdout + p.stderr
    assert p.returncode != 0 and f"pid {holder.pid}" in text, tail(text)
    assert text.count("is in use by another run") >= 2, tail(text)   # rank 1 learnt it from rank 0
    assert os.listdir(out) == [LOCK]


def test_every_rank_of_a_diverging_torchrun_exits(tmp_path):
    """The same for a diverging loss: the ranks agree at the window, none waits in a collective."""
    data, out = make_random_dataset(tmp_path / "data", n=16), tmp_path / "run"
    args = train_args(out, data, "optim.batch_size_per_gpu=4", "optim.epochs=2", "optim.schedule=[[0,1e30]]")
    p = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", *args], timeout=120, check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and text.count("error: training diverged: loss is") >= 2, tail(text)
    assert "the last good checkpoint is none yet" in text and not (out / "checkpoint.pt").exists()
