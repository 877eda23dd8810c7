"""Checkpoints: atomic writes by rank 0, automatic resume, strict compatibility checks.

A checkpoint is a plain dict so that `torch.load(weights_only=True)` can read it:
    model       state dict of the UNWRAPPED RotNet (trunk.* and head.*), no DDP/compile prefixes
    optimizer, scaler   state dicts (scaler may be None)
    epoch       epochs completed;  step: optimizer steps taken in total
    epoch_step  steps already taken inside `epoch` (non-zero for mid-epoch/preemption saves)
    rng         CPU/CUDA RNG states (tensors)
    loader      the train loader's state_dict of every rank (list, index = rank)
    config      the resolved config as a dict;  commit: git commit of the code
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

from rotnet.atomic import atomic_path
from rotnet.cli import InputError

LATEST = "checkpoint.pt"
_NUMBERED = re.compile(r"checkpoint_(\d+)\.pt$")


def git_commit() -> str:
    """Commit hash of the code (with '-dirty' when the tree has changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_save(obj, path: str | Path) -> None:
    """torch.save through rotnet.atomic: a crash or preemption mid-write leaves the previous
    checkpoint intact."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def _snapshot(src: Path, dst: Path) -> None:
    """Keep a copy of `src` under `dst` without writing the bytes again.

    A hard link is enough: the next save replaces `src` by rename, so `dst` keeps the old
    inode. Filesystems without hard links get a real copy.
    """
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def save_checkpoint(state: dict, output_dir: str | Path, keep_last: int, numbered: bool) -> Path:
    """Write `checkpoint.pt` (the resume point) plus rolling `checkpoint_EPOCH.pt` copies.

    keep_last: how many of the rolling per-epoch copies to keep (older ones are deleted);
    numbered: also keep a permanent `epoch_EPOCH.pt` copy (train.save_every).
    """
    out = Path(output_dir)
    atomic_save(state, out / LATEST)
    if state.get("epoch_step", 0) == 0:  # epoch boundary: keep history
        epoch = state["epoch"]
        if keep_last > 0:
            _snapshot(out / LATEST, out / f"checkpoint_{epoch:04d}.pt")
            rolling = sorted((p for p in out.glob("checkpoint_*.pt") if _NUMBERED.search(p.name)),
                             key=lambda p: int(_NUMBERED.search(p.name).group(1)))
            for old in rolling[:-keep_last]:
                old.unlink(missing_ok=True)
        if numbered:
            _snapshot(out / LATEST, out / f"epoch_{epoch:04d}.pt")
    return out / LATEST


def find_checkpoint(output_dir: str | Path) -> Path | None:
    p = Path(output_dir) / LATEST
    return p if p.is_file() else None


class CheckpointError(InputError):
    """A checkpoint (or probe state) that is missing or cannot be read; the message names the file."""


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with weights_only=True (no arbitrary code from pickles); CheckpointError naming the
    file when it is missing or not a readable checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (MemoryError, torch.cuda.OutOfMemoryError):   # the machine's limit, not the file's fault
        raise
    except Exception as e:  # truncated file, wrong format, disallowed pickle content: torch says which
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {first}") from e


def differences(saved: dict, current: dict, keys, saved_as: str = "checkpoint") -> list[str]:
    """'key: <saved_as> has A, this run has B' for each key (dotted: a path into nested dicts)
    whose values differ: how a refused resume names what changed."""
    def get(d, dotted: str):
        for k in dotted.split("."):
            d = d.get(k) if isinstance(d, dict) else None
        return d

    return [f"{k}: {saved_as} has {get(saved, k)!r}, this run has {get(current, k)!r}"
            for k in keys if get(saved, k) != get(current, k)]


def check_compatible(path: str | Path, saved: dict, current: dict, keys: tuple[str, ...]) -> None:
    """Refuse the checkpoint at `path` whose config `saved` differs from `current` in `keys`
    (dotted): CheckpointError naming the file and what differs."""
    diffs = differences(saved, current, keys)
    if diffs:
        raise CheckpointError(f"checkpoint is from a different model/config: {path}\n  " + "\n  ".join(diffs))
