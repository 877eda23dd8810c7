"""Per-epoch probe state in the eval output folder, and resuming from it.

    state = load_state(out / "probe_state_pretrained.pt", signature)   # None: start fresh
    epochs_done = restore_state(state, probe_set, optimizer)
    save_state(path, probe_set, optimizer, {"signature": ..., "epoch": ..., "result": None, "history": [...]})

The signature is everything that changes the numbers (checkpoint, head, layers,
epochs, schedule, batch, data settings, ...). A rerun with the same arguments picks
up after the last finished epoch; a rerun with different ones is refused, naming
each difference, instead of silently mixing two protocols in one result.
"""
from __future__ import annotations

from pathlib import Path

from rotnet.checkpoint import atomic_save, differences, load_checkpoint
from rotnet.cli import InputError

STATE_VERSION = 1


class ResumeMismatch(InputError):
    """The output folder holds a run made with different arguments."""


def load_state(path: Path, signature: dict) -> dict | None:
    """The saved state at `path` if its signature matches; None if there is none.

    Raises ResumeMismatch listing what differs when the arguments changed.
    """
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    saved = state.get("signature", {})
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
    """Atomically write the resume point (rank 0 only). progress: "signature", "epoch" (epochs
    completed), "result" (the final val metrics once the run is complete, so a rerun just rewrites
    the reports; else None) and "history" (per-epoch stats).

    The trunk is stored only when fine-tuning (a frozen trunk is the checkpoint's).
    """
    trunk = probe_set.trunk.state_dict() if probe_set.finetune else None
    atomic_save({"version": STATE_VERSION, **progress, "probes": probe_set.heads.state_dict(),
                 "optimizer": optimizer.state_dict(), "trunk": trunk}, path)
