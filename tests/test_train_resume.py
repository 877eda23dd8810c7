"""train.py stops, checkpoints and resumes (single process, CPU): exactness, SIGTERM, bf16, refusal.

Runs are `train.py` on tiny PNG data sets made in tmp_path (helpers shared with
tests/test_train_distributed.py): real subprocesses where a signal stops them, else in this process.
"""
from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.test_train_distributed import PY, REPO, load_ckpt, make_random_dataset, run_env, tail, train_args
from tests.tiny_run import train_in_process

# One intra-op thread and the CPU, as run_env gives the subprocesses.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread", "cpu_only")]


def test_interrupted_and_resumed_run_is_bit_exact(tmp_path):
    """max_steps=8 then a rerun to the end == one uninterrupted run, bit for bit (CPU fp32:
    same kernels, same order; random crops replay from the loader state and RNG state)."""
    data = make_random_dataset(tmp_path / "data", n=24)     # batch 4: 6 steps/epoch, 2 epochs
    common = ("optim.batch_size_per_gpu=4", "optim.epochs=2")
    full, parts = tmp_path / "full", tmp_path / "parts"
    train_in_process(train_args(full, data, *common)[1:])
    first = train_in_process(train_args(parts, data, *common, "train.max_steps=8")[1:])   # stops in epoch 1
    assert (load_ckpt(parts)["epoch"], load_ckpt(parts)["epoch_step"]) == (1, 2), tail(first)
    second = train_in_process(train_args(parts, data, *common)[1:])
    assert "resumed from" in second and "epoch 1, step in epoch 2" in second

    a, b = load_ckpt(full), load_ckpt(parts)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model {k} differs after resume"
    for (i, sa), sb in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), f"momentum of param {i}"


def _wait_for_steps(p: subprocess.Popen, min_step: int, timeout: float) -> str:
    """Read p's stderr until the tqdm bar of epoch 0 shows >= min_step steps; return what was read."""
    text, deadline = "", time.monotonic() + timeout
    fd = p.stderr.fileno()
    while time.monotonic() < deadline and p.poll() is None:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            text += os.read(fd, 65536).decode(errors="replace")
            steps = [int(s) for s in re.findall(r"epoch 0:[^\r\n|]*\|[^|]*\|\s*(\d+)/", text)]
            if steps and max(steps) >= min_step:
                return text
    pytest.fail(f"training did not reach step {min_step} in {timeout}s\n{tail(text)}")


def _sigterm_after(args: list[str], min_step: int) -> tuple[int, str]:
    """Start train.py, SIGTERM it once its progress bar (forced on, updated every step) shows
    `min_step` steps, and return (exit code, stderr)."""
    p = subprocess.Popen([PY, *args], cwd=REPO, env=run_env(ROTNET_PROGRESS=1), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        _wait_for_steps(p, min_step=min_step, timeout=120)
        p.send_signal(signal.SIGTERM)
        rest = p.communicate(timeout=60)[1].decode(errors="replace")
    finally:
        p.kill()
    return p.returncode, rest


def test_sigterm_mid_epoch_checkpoints_exits_3_and_resumes(tmp_path):
    data = make_random_dataset(tmp_path / "data", n=400)    # batch 4: 100 steps in the epoch
    out = tmp_path / "run"
    args = train_args(out, data, "optim.batch_size_per_gpu=4", "optim.epochs=1")
    returncode, rest = _sigterm_after(args, min_step=3)
    assert returncode == 3, tail(rest)               # rotnet.preemption.REQUEUE_EXIT_CODE
    assert "stop signal received" in rest

    ckpt = load_ckpt(out)                            # weights_only=True load
    assert ckpt["epoch"] == 0 and 0 < ckpt["epoch_step"] < 100 and ckpt["step"] == ckpt["epoch_step"]
    stopped = ckpt["epoch_step"]

    again = train_in_process([*args[1:], f"train.max_steps={stopped + 2}"])
    assert f"resumed from {out / 'checkpoint.pt'}: epoch 0, step in epoch {stopped}" in again
    ckpt = load_ckpt(out)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (0, stopped + 2, stopped + 2)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """16 bf16 steps (4 epochs x 4) on data with an obvious 'up' (bright top, dark bottom)."""
    tmp = tmp_path_factory.mktemp("bf16")
    data = make_random_dataset(tmp / "data", n=32, updown=True)
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:   # one_thread and cpu_only are per test; this is per module
        mp.setattr(torch.cuda, "is_available", lambda: False)
        stderr = train_in_process(train_args(out, data, "train.precision=bf16", "optim.batch_size_per_gpu=8",
                                             "optim.epochs=4", "optim.schedule=[[0,0.05]]")[1:])
    return data, out, stderr


def test_bf16_autocast_on_cpu_trains(bf16_run):
    _, out, stderr = bf16_run
    assert "precision bf16" in stderr
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in epochs]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] - 0.1, f"loss did not decrease: {losses}"
    assert all(v.dtype == torch.float32 for v in load_ckpt(out)["model"].values() if v.is_floating_point())


def test_checkpoint_of_another_architecture_is_refused(bf16_run, tmp_path, capsys):
    data, out, _ = bf16_run
    other = tmp_path / "other"
    shutil.copytree(out, other)
    with pytest.raises(SystemExit) as exit_:
        train_in_process(train_args(other, data, "model.arch=nin", "optim.batch_size_per_gpu=8")[1:])
    stderr = capsys.readouterr().err
    assert exit_.value.code != 0
    assert "checkpoint is from a different model/config" in stderr
    assert "model.arch: checkpoint has 'alexnet', this run has 'nin'" in stderr, tail(stderr)


def test_stop_on_the_last_step_of_an_epoch_resumes_exactly(tmp_path):
    """With one step per epoch every stop falls on an epoch's last step."""
    data = make_random_dataset(tmp_path / "data", n=4)      # batch 4: 1 step/epoch
    out, epochs = tmp_path / "run", 40
    args = train_args(out, data, "optim.batch_size_per_gpu=4", f"optim.epochs={epochs}")
    returncode, rest = _sigterm_after(args, min_step=1)
    assert returncode == 3, tail(rest)
    train_in_process(args[1:])
    ckpt = load_ckpt(out)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (epochs, 0, epochs)
