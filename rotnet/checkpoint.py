"""Checkpoints: atomic writes by rank 0, automatic resume, strict compatibility checks.

A checkpoint is a plain dict (`torch.load(weights_only=True)` reads it): model (the UNWRAPPED
RotNet's state dict), optimizer, scaler, epoch, epoch_step (steps done inside `epoch`), step
(in total), rng, loader (every rank's loader state, index = rank), world_size, config, commit,
trackers ({tracker: run id} of W&B / MLflow; rotnet/progress.py).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

from rotnet.atomic import atomic_path, write_bytes
from rotnet.cli import InputError

LATEST = "checkpoint.pt"
_NUMBERED = re.compile(r"checkpoint_(\d+)\.pt$")
_COPY = re.compile(r"(?:checkpoint|epoch)_(\d+)\.pt$")   # rolling (keep_last) or kept (save_every)


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
    """torch.save through rotnet.atomic: a crash mid-write leaves the previous file intact. Serialised
    in memory first: torch's writer turns a full disk into an unreadable RuntimeError, and the
    DiskFullError needs the size."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def _snapshot(src: Path, dst: Path) -> None:
    """Keep a copy of `src` as `dst`: a hard link (the next save renames over `src`), else a copy."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        with atomic_path(dst, size=src.stat().st_size) as tmp:
            shutil.copyfile(src, tmp)


def save_checkpoint(state: dict, output_dir: str | Path, keep_last: int, numbered: bool) -> Path:
    """Write `checkpoint.pt`; at an epoch boundary keep the last `keep_last` `checkpoint_EPOCH.pt`
    and, when `numbered`, a permanent `epoch_EPOCH.pt` (train.save_every)."""
    out = Path(output_dir)
    atomic_save(state, out / LATEST)
    if state.get("epoch_step", 0) == 0:
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
    """torch.load with weights_only=True; CheckpointError naming the file if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (MemoryError, torch.cuda.OutOfMemoryError):   # the machine's limit, not the file's fault
        raise
    except Exception as e:  # truncated file, wrong format, disallowed pickle content: torch says which
        first = (str(e).splitlines() or [""])[0]
        copies = {int(m.group(1)): p.name for p in path.parent.glob("*.pt") if (m := _COPY.match(p.name))}
        newest = [copies[n] for n in sorted(copies, reverse=True)[:3]]
        hint = (f"; the copies beside it, newest first: {', '.join(newest)} (copy one over {path.name} to "
                "resume from its epoch)" if path.name == LATEST and newest else "")
        why = f"{type(e).__name__}: {first}" if first else f"{type(e).__name__} (cut short?)"
        raise CheckpointError(f"cannot load checkpoint {path}: {why}{hint}") from e


def differences(saved: dict, current: dict, keys, saved_as: str = "checkpoint") -> list[str]:
    """'key: <saved_as> has A, this run has B' for each dotted key whose values differ."""
    def get(d, dotted: str):
        for k in dotted.split("."):
            d = d.get(k) if isinstance(d, dict) else None
        return d

    return [f"{k}: {saved_as} has {get(saved, k)!r}, this run has {get(current, k)!r}"
            for k in keys if get(saved, k) != get(current, k)]


def check_compatible(path: str | Path, saved: dict, current: dict, keys: tuple[str, ...]) -> None:
    """CheckpointError naming `path` and the `keys` in which `saved` differs from `current`."""
    diffs = differences(saved, current, keys)
    if diffs:
        raise CheckpointError(f"checkpoint is from a different model/config: {path}\n  " + "\n  ".join(diffs))


def settings_line(path: str | Path, saved: dict, rest: str) -> str:
    """The one line saying which settings come from checkpoint `path` (whose config is `saved`):
    its model always; `rest` says what else."""
    model = " ".join(f"model.{k}={v}" for k, v in (saved.get("model") or {}).items())
    return f"settings from the checkpoint {path}: {model}; {rest}"
