"""train.py's error policy, in process: bad input ends in one `error:` line and exit 2; anything
else (a bug, out of memory) propagates with its traceback, wherever it happens."""
import signal

import pytest
import torch

import train
from rotnet.cli import UsageExit
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
