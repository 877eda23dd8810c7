"""Atomic checkpoint writes, rolling copies, weights_only loading, compatibility checks."""
import pytest
import torch

from rotnet.checkpoint import (
    CheckpointError,
    atomic_save,
    check_compatible,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    atomic_save({"w": torch.ones(2)}, p)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic_save({"w": torch.zeros(2)}, p)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(p)["w"], torch.ones(2))


def test_rolling_and_numbered(tmp_path):
    for epoch in range(1, 6):
        save_checkpoint({"epoch": epoch, "epoch_step": 0}, tmp_path, keep_last=2, numbered=epoch % 2 == 0)
    save_checkpoint({"epoch": 5, "epoch_step": 7}, tmp_path, keep_last=2, numbered=False)   # mid-epoch
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["checkpoint.pt", "checkpoint_0004.pt", "checkpoint_0005.pt",
                     "epoch_0002.pt", "epoch_0004.pt"]
    assert load_checkpoint(find_checkpoint(tmp_path))["epoch_step"] == 7
    assert load_checkpoint(tmp_path / "checkpoint_0005.pt")["epoch_step"] == 0


class Evil:
    """Any class outside the weights_only allow-list: loading it could run code."""


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "trunc.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="trunc.pt"):
        load_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_check_compatible_lists_differences():
    saved = {"model": {"arch": "alexnet", "width": 1.0}}
    check_compatible("run/checkpoint.pt", saved, saved, ("model.arch", "model.width"))
    with pytest.raises(CheckpointError, match="run/checkpoint.pt") as info:
        check_compatible("run/checkpoint.pt", saved, {"model": {"arch": "resnet50", "width": 1.0}},
                         ("model.arch", "model.width"))
    assert "model.arch: checkpoint has 'alexnet', this run has 'resnet50'" in str(info.value)
    assert "width" not in str(info.value)


def test_a_damaged_latest_checkpoint_names_the_copies_beside_it(tmp_path):
    """checkpoint.pt cut short (a disk fault; rank 0's writes are atomic): the error names the rolling
    and kept copies, newest first, which a user can copy over it to resume from that epoch."""
    for epoch in range(1, 5):
        save_checkpoint({"epoch": epoch, "epoch_step": 0}, tmp_path, keep_last=2, numbered=epoch == 1)
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    says = (r"checkpoint.pt: .*; the copies beside it, newest first: checkpoint_0004.pt, checkpoint_0003.pt, "
            r"epoch_0001.pt \(copy one over checkpoint.pt")
    with pytest.raises(CheckpointError, match=says):
        load_checkpoint(tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint_0004.pt").write_bytes(b"")   # a copy itself: no advice to copy another
    with pytest.raises(CheckpointError, match=r"checkpoint_0004.pt: EOFError \(cut short\?\)$"):
        load_checkpoint(tmp_path / "checkpoint_0004.pt")
