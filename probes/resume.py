"""Per-epoch probe state in the eval output folder, and resuming from it.

    state = load_state(out / "probe_state_pretrained.pt", signature)   # None: start fresh
    epochs_done = restore_state(state, probe_set, optimizer)
    save_state(path, probe_set, optimizer, {"signature": ..., "epoch": ..., "result": None, "history": [...]})

A rerun whose signature (what changes the numbers) differs is refused, naming each difference.
"""
from __future__ import annotations

from pathlib import Path

from rotnet.checkpoint import atomic_save, differences, load_checkpoint
from rotnet.cli import InputError
from rotnet.config import migrate

STATE_VERSION = 1


class ResumeMismatch(InputError):
    """The output folder holds a run made with different arguments."""


def load_state(path: Path, signature: dict) -> dict | None:
    """The saved state at `path` (None if there is none); ResumeMismatch when its signature differs."""
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    saved = state.get("signature", {})
    if isinstance(saved.get("data"), dict):   # signed by an older rotnet: in today's keys
        saved = {**saved, "data": migrate({"data": saved["data"]})["data"]}
    diffs = differences(saved, signature, sorted(set(saved) | set(signature)), saved_as="saved run")
    if diffs:
        raise ResumeMismatch(
            f"{path} is from an eval run with different arguments:\n  " + "\n  ".join(diffs)
            + f"\nRerun with the same arguments to resume, pass another --output-dir, or delete {path}."
        )
    return state


def restore_state(state: dict, probe_set, optimizer) -> int:
    """Load a saved state into the probes, a fine-tuned trunk and the optimizer; returns epochs done."""
    probe_set.heads.load_state_dict(state["probes"])
    if probe_set.finetune:
        probe_set.trunk.load_state_dict(state["trunk"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"]


def save_state(path: Path, probe_set, optimizer, progress: dict) -> None:
    """Atomically write the resume point (rank 0). progress "result": the final val metrics once
    complete (a rerun just rewrites the reports). The trunk is stored only when fine-tuning."""

    trunk = probe_set.trunk.state_dict() if probe_set.finetune else None
    atomic_save({"version": STATE_VERSION, **progress, "probes": probe_set.heads.state_dict(),
                 "optimizer": optimizer.state_dict(), "trunk": trunk}, path)
