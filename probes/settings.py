"""How eval.py's arguments become one evaluation run: checkpoint lookup, config layering,
layer selection, schedule stretching and the resume signature.

Errors are `UsageError`s whose message says what was wrong and what the valid
choices are; eval.py prints them and exits.
"""
from __future__ import annotations

from pathlib import Path

from probes.heads import valid_layers
from rotnet.checkpoint import find_checkpoint

# Data keys that change speed, not results: left out of the resume signature.
DATA_SPEED_KEYS = ("backend", "num_threads", "prefetch", "hw_decoder_load", "device_memory_padding",
                   "host_memory_padding", "normalize", "resident")


class UsageError(ValueError):
    """Bad command-line input; the message names it and lists valid choices."""


def resolve_checkpoint(arg: str | None, output_dir: str, config_name: str) -> Path | None:
    """The checkpoint file to evaluate; None for 'random'.

    arg None: the latest checkpoint of the run in `output_dir` (train.output_dir of
    `config_name`); a folder: its checkpoint.pt; else a file.
    """
    if arg == "random":
        return None
    if arg is None:
        path = find_checkpoint(output_dir)
        if path is None:
            raise UsageError(f"no checkpoint in {output_dir}/ (train.output_dir of {config_name}). Run "
                             f"`python train.py --config {config_name}` first, or pass --checkpoint PATH, "
                             "or --checkpoint random for the random-init baseline.")
        return path
    p = Path(arg)
    if p.is_dir():
        found = find_checkpoint(p)
        if found is None:
            raise UsageError(f"no checkpoint.pt in folder {p}; pass the checkpoint file itself")
        return found
    if not p.is_file():
        raise UsageError(f"checkpoint not found: {p} (pass a checkpoint file, a run folder, or 'random')")
    return p


def parse_layers(text: str, trunk, head: str) -> list[str]:
    """'conv4' | 'conv2,conv4' | 'all' -> validated layers, shallow to deep, no duplicates."""
    valid = valid_layers(head, trunk)
    if text.strip() == "all":
        return valid
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in wanted if name not in valid]
    if bad or not wanted:
        where = f"--head {head} on {trunk.arch}" if valid != list(trunk.layer_names) else trunk.arch
        raise UsageError(f"--layer {text!r}: unknown layer(s) {', '.join(bad) or '(none given)'} for {where}; "
                         f"valid choices: {', '.join(valid)} or all")
    return sorted(set(wanted), key=valid.index)


def stretch_schedule(table: list[list[float]], from_epochs: int, to_epochs: int,
                     lr: float | None) -> list[list[float]]:
    """(epoch, lr) table for `to_epochs` epochs.

    Milestones scale by to/from and are NOT rounded: rounding would collapse every stage
    of a 1-2 epoch smoke run onto epoch 0. lr given: every entry is multiplied so the
    first equals it (the schedule keeps its ratios).
    """
    if from_epochs < 1 or to_epochs < 1:
        raise UsageError(f"epochs must be >= 1 (probe.epochs={from_epochs}, --epochs={to_epochs})")
    f = to_epochs / from_epochs
    g = 1.0 if lr is None else lr / table[0][1]
    return [[round(e * f, 4), float(f"{v * g:.6g}")] for e, v in table]


def run_signature(*, kind: str, checkpoint: str, head: str, layers: list[str], epochs: int,
                  schedule: list[list[float]], batch_size: int, world_size: int, precision: str,
                  finetune: bool, seed: int, labels_per_class: int, cfg_dict: dict) -> dict:
    """Everything that changes the numbers of one probe run (resume refuses a mismatch)."""
    data = {k: v for k, v in cfg_dict["data"].items() if k not in DATA_SPEED_KEYS}
    probe = {k: cfg_dict["probe"][k] for k in ("momentum", "nesterov", "weight_decay")}
    return {"model": kind, "checkpoint": checkpoint, "head": head, "layers": list(layers), "epochs": epochs,
            "schedule": schedule, "batch_size": batch_size, "world_size": world_size, "precision": precision,
            "finetune": finetune, "seed": seed, "labels_per_class": labels_per_class, "data": data,
            "probe": probe}
