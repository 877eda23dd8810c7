"""Launcher detection: torchrun variables first, then SLURM's, else one process."""
from rotnet import distributed
from rotnet.distributed import detect_launcher


def test_torchrun_wins(monkeypatch):
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("WORLD_SIZE", "8"), monkeypatch.setenv("LOCAL_RANK", "1")
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
