"""Per-epoch probe state in the eval output folder, and resuming from it.

    state = load_state(out / "probe_state_pretrained.pt", signature)   # None: start fresh
    save_state(path, signature=..., epoch=..., probes=..., optimizer=..., trunk=None, result=None)

The signature is everything that changes the numbers (checkpoint, head, layers,
epochs, schedule, batch, data settings, ...). A rerun with the same arguments picks
up after the last finished epoch; a rerun with different ones is refused, naming
each difference, instead of silently mixing two protocols in one result.
"""
from __future__ import annotations

from pathlib import Path

from rotnet.checkpoint import atomic_save, load_checkpoint

STATE_VERSION = 1


class ResumeMismatch(RuntimeError):
    """The output folder holds a run made with different arguments."""


def signature_diff(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two flat signatures."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: saved run has {saved.get(k)!r}, this run has {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]


def load_state(path: Path, signature: dict) -> dict | None:
    """The saved state at `path` if its signature matches; None if there is none.

    Raises ResumeMismatch listing what differs when the arguments changed.
    """
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    diffs = signature_diff(state.get("signature", {}), signature)
    if diffs:
        raise ResumeMismatch(
            f"{path} is from an eval run with different arguments:\n  " + "\n  ".join(diffs)
            + f"\nRerun with the same arguments to resume, pass another --output-dir, or delete {path}."
        )
    return state


def save_state(path: Path, *, signature: dict, epoch: int, probes: dict, optimizer: dict,
               trunk: dict | None = None, result: dict | None = None, history: list | None = None) -> None:
    """Atomically write the resume point (rank 0 only): `epoch` = epochs completed.

    `trunk` is stored only when fine-tuning (a frozen trunk is the checkpoint's);
    `result` holds the final val metrics once the run is complete, so a rerun
    just rewrites the reports.
    """
    atomic_save({"version": STATE_VERSION, "signature": signature, "epoch": epoch, "probes": probes,
                 "optimizer": optimizer, "trunk": trunk, "result": result, "history": history or []}, path)
