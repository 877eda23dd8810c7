"""What the user sees: rank-0 logging, a tqdm progress bar, TensorBoard scalars, JSON lines, and
the same scalars to W&B / MLflow when train.loggers asks (rotnet/trackers.py).
Other ranks log at WARNING, so real problems on any rank still reach the job's stderr."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from rotnet.atomic import append_text

log = logging.getLogger("rotnet")


def setup_logging(is_main: bool, output_dir: str | Path | None = None) -> None:
    """INFO on rank 0 (stderr, plus `output_dir/train.log`), WARNING elsewhere."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if is_main and output_dir is not None:
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)


class RunLogger:
    """Rank-0 sink for step scalars (bar, TensorBoard, trackers) and epoch stats (JSON lines, TensorBoard,
    trackers). `trackers`: a rotnet.trackers.Trackers that train.py sets after resume, else None."""

    def __init__(self, output_dir: str | Path, is_main: bool, jsonl_name: str = "log.jsonl",
                 tensorboard: bool = True):
        self.is_main = is_main
        self.jsonl = Path(output_dir) / jsonl_name
        self.tb = self.bar = self.trackers = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import
            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def start_epoch(self, epoch: int, total: int, initial: int = 0) -> None:
        # Bars only on a terminal (SLURM logs are files); ROTNET_PROGRESS=1/0 forces them on/off.
        forced = os.environ.get("ROTNET_PROGRESS")
        if self.is_main and (forced == "1" if forced is not None else sys.stderr.isatty()):
            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", dynamic_ncols=True,
                            file=sys.stderr, leave=True)

    def step(self, global_step: int, n_steps: int, scalars: dict[str, float]) -> None:
        """n_steps: steps since the last call."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.update(n_steps)
            self.bar.set_postfix({k: _fmt(v) for k, v in scalars.items()}, refresh=False)
        if self.tb is not None or self.trackers is not None:
            tagged = {f"train/{k}": v for k, v in scalars.items()}
            if self.tb is not None:
                for k, v in tagged.items():
                    self.tb.add_scalar(k, v, global_step)
            if self.trackers is not None:
                self.trackers.log(tagged, global_step)

    def end_epoch(self, stats: dict) -> None:
        """Append one JSON line; mirror numeric stats under epoch/ to TensorBoard (x: the epoch) and
        the trackers (x: the step, with the epoch as a scalar)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.is_main:
            return
        append_text(self.jsonl, json.dumps(stats) + "\n")
        if self.tb is not None:
            for k, v in epoch_scalars(stats).items():
                self.tb.add_scalar(k, v, stats["epoch"])
            self.tb.flush()
        if self.trackers is not None:
            self.trackers.log({**epoch_scalars(stats), "epoch": stats["epoch"]}, stats["step"])

    def close(self, finished: bool = True) -> None:
        """finished: False when the run stops to be resumed (preemption)."""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.trackers is not None:
            self.trackers.close(finished)


def epoch_scalars(stats: dict) -> dict[str, float]:
    """An epoch record's numbers but its epoch, tagged: {"epoch/loss": ..., "epoch/knn_top1/conv3": ...}."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, (int, float)) and k != "epoch":
            out[f"epoch/{k}"] = v
        elif isinstance(v, dict):   # per-layer values, e.g. knn_top1: epoch/knn_top1/conv3
            out.update({f"epoch/{k}/{sub}": x for sub, x in v.items() if isinstance(x, (int, float))})
    return out


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
