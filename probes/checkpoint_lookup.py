"""eval.py --checkpoint -> the checkpoint file: a file, a run folder, the config's train.output_dir
when not given, or none for 'random'."""
from __future__ import annotations

from pathlib import Path

from rotnet.checkpoint import find_checkpoint
from rotnet.cli import UsageError


def resolve_checkpoint(arg: str | None, output_dir: str, config_name: str) -> Path | None:
    """Checkpoint file; None for 'random'. None: the latest of `output_dir`; a folder: its checkpoint.pt."""
    if arg == "random":
        return None
    p = Path(output_dir if arg is None else arg)
    if arg is not None and p.is_file():
        return p
    found = find_checkpoint(p)
    if found is None and arg is None:
        raise UsageError(f"no checkpoint in {output_dir}/ (train.output_dir of {config_name}). Run "
                         f"`python train.py --config {config_name}` first, or pass --checkpoint PATH, "
                         "or --checkpoint random for the random-init baseline.")
    if found is None:
        raise UsageError(f"no checkpoint.pt in folder {p}; pass the checkpoint file itself" if p.is_dir() else
                         f"checkpoint not found: {p} (pass a checkpoint file, a run folder, or 'random')")
    return found
