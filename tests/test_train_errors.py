"""train.py's error policy, in process: bad input ends in one `error:` line and exit 2; anything
else (a bug, out of memory) propagates with its traceback, wherever it happens. Faults a user meets
end the same way: a busy output folder, a full disk while saving, a diverging loss, each with the
last good checkpoint kept (the lock with real train.py processes: tests/test_train_lock.py)."""
import errno
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

import rotnet.checkpoint
import rotnet.epoch_log
import train
from rotnet.atomic import TMP, atomic_path
from rotnet.cli import UsageExit
from rotnet.runlock import LOCK
from tests.pipelines.images import make_folder

TOY = ["model.width=0.25", "data.crop_size=64", "data.resize_size=72", "optim.batch_size_per_gpu=4",
       "train.precision=fp32", "loader.backend=torch", "loader.num_threads=0", "train.monitor_every=0"]


@pytest.fixture
def args(tmp_path, monkeypatch, one_thread):
    """train.py arguments for a toy run on 8 tiny images, one process; the stop handlers that
    build_run arms are restored after."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROTNET_PROGRESS", "0")
    make_folder(tmp_path / "data" / "train", [4, 4], size=(72, 72))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield ["--config", "configs/sample.yaml", f"data.root={tmp_path / 'data'}",
           f"train.output_dir={tmp_path / 'run'}", *TOY]
    for s, h in handlers.items():
        signal.signal(s, h)


def one_line(capsys, exc: pytest.ExceptionInfo) -> str:
    """The `error:` line of a UsageExit (exit 2), checked to be the last line and the only one."""
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1, err
    return lines[-1]


def test_a_bug_while_building_the_run_keeps_its_traceback(args, monkeypatch):
    def build_run(*a, **k):
        raise RuntimeError("injected bug in build_run")
    monkeypatch.setattr(train, "build_run", build_run)
    with pytest.raises(RuntimeError, match="injected bug in build_run"):
        train.main(args)


def test_a_bug_while_resuming_keeps_its_traceback(args, monkeypatch, tmp_path):
    def load_checkpoint(*a, **k):
        raise RuntimeError("CUDA out of memory (injected)")
    monkeypatch.setattr(train, "find_checkpoint", lambda out: tmp_path / "run" / "checkpoint.pt")
    monkeypatch.setattr(train, "load_checkpoint", load_checkpoint)
    with pytest.raises(RuntimeError, match="out of memory"):
        train.main(args)


def test_an_unreadable_checkpoint_is_one_line_naming_it(args, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageExit) as exc:
        train.main(args)
    line = one_line(capsys, exc)
    assert "cannot load checkpoint" in line and str(tmp_path / "run" / "checkpoint.pt") in line
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == b"not a checkpoint"


def test_a_bad_schedule_table_is_one_line(args, capsys):
    with pytest.raises(UsageExit) as exc:
        train.main([*args, "optim.schedule=[[5,0.1]]"])
    assert "optim.schedule: epochs must start at 0" in one_line(capsys, exc)


def test_more_ranks_than_gpus_is_one_line(args, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in dict(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2).items():
        monkeypatch.setenv(k, str(v))
    with pytest.raises(UsageExit) as exc:
        train.main(args)
    assert "2 ranks on this node but 1 GPU(s)" in one_line(capsys, exc)


# A process that holds the folder's lock until killed (no torch import: it starts in a blink).
HOLD = ("import sys, time; from rotnet.runlock import hold_folder\n"
        "with hold_folder(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")


def epoch_of(out) -> tuple[int, int]:
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    return ckpt["epoch"], ckpt["epoch_step"]


def test_a_folder_held_by_another_process_is_refused_naming_it_writing_nothing(args, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=train.__file__.rsplit("/", 1)[0])
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UsageExit) as exc:
            train.main(args)
        line = one_line(capsys, exc)
        assert os.listdir(out) == [LOCK]
        train.main([*args, "train.lock=false", "train.max_steps=1"])   # the override for lockless mounts
    finally:
        holder.kill()
        holder.wait()
    assert f"{out} is in use by another run (host {socket.gethostname()}, pid {holder.pid}, started " in line


def test_the_lock_is_released_when_the_run_ends(args, tmp_path):
    train.main([*args, "optim.epochs=1"])
    train.main([*args, "optim.epochs=2"])   # not refused by the first run's lock
    assert epoch_of(tmp_path / "run") == (2, 0)
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(TMP)]


def test_a_full_disk_names_the_file_and_keeps_the_last_good_checkpoint(args, tmp_path, capsys, monkeypatch):
    train.main([*args, "optim.epochs=1"])
    out = tmp_path / "run"

    def fills_the_disk(path, data):   # writes half, then the disk is full
        with atomic_path(path, size=len(data)) as tmp, open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rotnet.checkpoint, "write_bytes", fills_the_disk)
    with pytest.raises(UsageExit) as exc:
        train.main([*args, "optim.epochs=2"])
    line = one_line(capsys, exc)
    assert line.startswith(f"error: disk full writing {out / 'checkpoint.pt'}: it needs ")
    kept = f"{out / 'checkpoint.pt'} (epoch 1, step in epoch 0)"
    assert line.endswith("bytes free there; nothing was replaced: free some space (or write elsewhere) and "
                         f"run it again; the last good checkpoint is kept: {kept}")
    assert epoch_of(out) == (1, 0) and not [n for n in os.listdir(out) if n.startswith(TMP)]


def test_a_diverging_loss_is_one_line_and_a_rerun_resumes_from_the_last_good_one(args, tmp_path, capsys):
    out = tmp_path / "run"
    train.main([*args, "optim.epochs=1"])
    with pytest.raises(UsageExit) as exc:
        train.main([*args, "optim.epochs=2", "optim.schedule=[[0,1e30]]"])
    line = one_line(capsys, exc)
    kept = re.escape(f"{out / 'checkpoint.pt'} (epoch 1, step in epoch 0)")
    assert re.match(r"error: training diverged: loss is nan at epoch 1 step 1 \(lr [0-9.]+e\+29\); the last "
                    f"good checkpoint is {kept}, and a rerun resumes from it", line), line
    assert epoch_of(out) == (1, 0)
    train.main([*args, "optim.epochs=2"])
    assert "resumed from" in capsys.readouterr().err and epoch_of(out) == (2, 0)


def test_non_finite_weights_are_never_saved(args, tmp_path, capsys, monkeypatch):
    class Blind(rotnet.epoch_log.EpochLog):   # the loss check misses it
        def close_window(self, i, lr):
            self.window.nan_to_num_(0.0, 0.0, 0.0)
            super().close_window(i, lr)
    monkeypatch.setattr(train, "EpochLog", Blind)
    with pytest.raises(UsageExit) as exc:
        train.main([*args, "optim.epochs=1", "optim.schedule=[[0,1e30]]"])
    line = one_line(capsys, exc)
    assert "training diverged: the weights are not finite at epoch 1 step 0" in line
    assert "the last good checkpoint is none yet" in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_zero_byte_image_is_one_line_naming_it(args, tmp_path, capsys):
    empty = tmp_path / "data" / "train" / "c1" / "empty.JPEG"
    empty.write_bytes(b"")
    with pytest.raises(UsageExit) as exc:
        train.main(args)
    assert f"empty (0-byte) image file: {empty}" in one_line(capsys, exc)


def test_a_full_disk_at_the_start_is_one_line(args, tmp_path, capsys, full_disk):
    with pytest.raises(UsageExit) as exc:
        train.main([*args, f"train.output_dir={full_disk}"])
    assert one_line(capsys, exc).startswith(f"error: disk full writing {full_disk}/")
    assert not [n for n in os.listdir(full_disk) if n.startswith(TMP)]
