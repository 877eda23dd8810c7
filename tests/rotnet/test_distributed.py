"""Launcher detection: torchrun variables first, then SLURM's, else one process; one GPU per rank.
train.precision / eval --precision 'auto': bf16 only where the device has it natively."""
import logging

import pytest
import torch

from rotnet import distributed
from rotnet.cli import UsageError
from rotnet.config import ConfigError, load_config
from rotnet.distributed import detect_launcher


def test_torchrun_wins(monkeypatch):
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("SLURM_PROCID", "0"), monkeypatch.setenv("SLURM_NTASKS", "2")
    assert detect_launcher() == ("torchrun", 3, 1, 8)


def test_slurm(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5"), monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert detect_launcher() == ("slurm", 5, 1, 8)
    monkeypatch.setenv("SLURM_NTASKS", "1")   # batch shell running torchrun itself
    assert detect_launcher()[0] == "single"


def test_single(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(v, raising=False)
    assert detect_launcher() == ("single", 0, 0, 1)


def test_first_slurm_host_fallback(monkeypatch):
    def no_scontrol(*a, **k):
        raise OSError("no scontrol")
    monkeypatch.setattr(distributed.subprocess, "run", no_scontrol)
    assert distributed._first_slurm_host("gpu[003-005,7],cpu1") == "gpu003"
    assert distributed._first_slurm_host("node12") == "node12"


# ---------------------------------------------------------------------------- ranks and GPUs

@pytest.fixture
def gpus(monkeypatch):
    """A machine with `gpus.count` CUDA devices, faked; set_device and the process group refuse
    to be reached (the error must come first)."""
    class Fake:
        count = 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: Fake.count)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_TASKS_PER_NODE", "SLURM_GPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)

    def unreachable(*a, **k):
        raise AssertionError("reached past the GPU check")
    monkeypatch.setattr(torch.cuda, "set_device", unreachable)
    monkeypatch.setattr(distributed.dist, "init_process_group", unreachable)
    return Fake


def torchrun_env(monkeypatch, rank: int, world: int, local_world: int) -> None:
    env = dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank % local_world, LOCAL_WORLD_SIZE=local_world)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


def test_more_ranks_than_gpus_is_one_clear_error_before_any_process_group(gpus, monkeypatch):
    torchrun_env(monkeypatch, rank=3, world=8, local_world=8)
    with pytest.raises(UsageError) as info:
        distributed.init_distributed()
    message = str(info.value)
    assert "8 ranks on this node but 1 GPU(s)" in message and "torchrun --nproc_per_node=1" in message
    assert "plain `python`" in message and "optim.global_batch_size" in message and "\n" not in message


def test_rank_zero_refuses_too_not_only_the_ranks_without_a_gpu(gpus, monkeypatch):
    gpus.count = 2
    torchrun_env(monkeypatch, rank=0, world=4, local_world=4)
    with pytest.raises(UsageError, match="4 ranks on this node but 2 GPU"):
        distributed.init_distributed()


def test_one_rank_per_gpu_gets_its_own(gpus, monkeypatch):
    gpus.count = 4
    torchrun_env(monkeypatch, rank=6, world=8, local_world=4)   # second node, third GPU
    assert distributed.pick_device("torchrun", local_rank=2) == torch.device("cuda", 2)
    assert distributed.pick_device("single", local_rank=0) == torch.device("cuda", 0)


def test_slurm_counts_this_nodes_tasks(gpus, monkeypatch):
    gpus.count = 4
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4(x2),8")
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert distributed.ranks_on_node("slurm", local_rank=0) == 4
    assert distributed.pick_device("slurm", local_rank=3) == torch.device("cuda", 3)
    monkeypatch.setenv("SLURM_NODEID", "2")
    with pytest.raises(UsageError, match="8 ranks on this node but 4 GPU.*srun --ntasks-per-node=4"):
        distributed.pick_device("slurm", local_rank=0)
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "1")   # each task sees only its own GPU: the first one
    assert distributed.pick_device("slurm", local_rank=5) == torch.device("cuda", 0)


CPU = torch.device("cpu")


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(distributed, "native_bf16", lambda device: native)
    assert distributed.resolve_precision("auto", CPU) == expected


def test_explicit_choice_is_kept_and_emulated_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(distributed, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger=distributed.log.name):
        assert distributed.resolve_precision("bf16", CPU) == "bf16"
    assert "emulated" in caplog.text
    assert distributed.resolve_precision("fp32", CPU) == "fp32"


def test_unknown_precision_names_key_and_choices():
    with pytest.raises(ConfigError, match=r"train.precision='fp8': expected one of auto, bf16, fp16, fp32"):
        load_config("configs/sample.yaml", ["train.precision=fp8"])
