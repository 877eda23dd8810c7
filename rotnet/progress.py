"""What the user sees: rank-0 logging, a tqdm progress bar, TensorBoard scalars, JSON lines, and
the same scalars to Weights & Biases and MLflow when train.loggers asks.
Other ranks log at WARNING, so real problems on any rank still reach the job's stderr.

    setup_logging(info.is_main, out)
    logger = RunLogger(out, info.is_main)            # log.jsonl (atomic appends) + TensorBoard
    logger.trackers = open_trackers(cfg, ckpt.get("trackers", {}), git_commit())   # None: neither
    logger.step(global_step, n, {"loss": 0.9}); logger.end_epoch(stats); logger.close()
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rotnet.atomic import append_text, write_text
from rotnet.cli import InputError
from rotnet.config import Config, config_to_dict

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
    trackers). `trackers`: the `Trackers` (below) that train.py sets after resume, else None."""

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


# ------------------------------------------------------------ W&B and MLflow
# The same scalars as TensorBoard, one tracker run per training run.
#
# `train.loggers: [tensorboard, wandb, mlflow]` (any subset). RunLogger (above) sends every
# step window (train/*) and epoch record (epoch/*, as in log.jsonl) here; only rank 0 opens runs.
#
#     require(cfg.train.loggers, "train.loggers")     # not installed: one line, exit 2, before any work
#     trackers = open_trackers(cfg, ckpt.get("trackers", {}), git_commit())   # None: no W&B, no MLflow
#     trackers.log({"train/loss": 0.9}, step=120)
#     state["trackers"] = trackers.ids()               # {"wandb": "3f9x0a1b", "mlflow": "8c0e..."}
#
# One run across restarts: the checkpoint keeps each tracker's run id, and a resumed run reopens it.
# No point twice: a run that died after its checkpoint logged steps that the resumed one trains
# again, so OUTPUT_DIR/trackers.json keeps the last step each run got; a resumed run logs only
# after it. The x axis is the trainer's step, `global_step` (W&B's own _step restarts with each
# process; MLflow's step is ours).
#
# Offline first: W&B runs in offline mode (unless WANDB_MODE says otherwise) under OUTPUT_DIR/wandb,
# synced later with `wandb sync`; MLflow writes to OUTPUT_DIR/mlflow.db (SQLite) unless
# MLFLOW_TRACKING_URI names another store. Both packages are imported only when asked for.

STATE = "trackers.json"   # {tracker: {"id": run id, "step": last step it got}} in OUTPUT_DIR
PROJECT = "rotnet"        # W&B project (WANDB_PROJECT) and MLflow experiment (MLFLOW_EXPERIMENT_NAME)


class TrackerError(InputError):
    """A tracker asked for that is not installed; the message says what to install."""


def require(names, where: str) -> None:
    """TrackerError naming the pip package for the first of `names` (asked for by `where`: train.loggers,
    --log-to) that is not installed. Looks the package up without importing it."""
    for name in names:
        if name in BACKENDS and importlib.util.find_spec(name) is None:
            raise TrackerError(f"{where} asks for {name}, which is not installed: pip install {name}")


@dataclass
class EvalTable:
    """eval.py's results for a tracker run: one row per (trunk, layer), and eval.png."""
    name: str                 # the eval folder's name: eval_linear, eval_knn_k10, ...
    columns: list[str]
    rows: list[list]
    figure: Path
    step: int                 # the checkpoint's step: where the table sits on the run's x axis


class _Wandb:
    """One W&B run, offline unless WANDB_MODE says otherwise, files under `out`/wandb."""

    def __init__(self, out: Path, run_id: str | None, params: dict | None):
        import wandb

        # resume="allow": the run `run_id` continues (a new offline segment; `wandb sync` joins them)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), id=run_id, resume="allow",
                              dir=str(out), name=out.name, mode=os.environ.get("WANDB_MODE", "offline"),
                              config=params)
        self.id = self.run.id
        self.run.define_metric("global_step")
        for prefix in ("train", "epoch", "eval"):
            self.run.define_metric(f"{prefix}/*", step_metric="global_step")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({**scalars, "global_step": step})

    def log_eval(self, t: EvalTable) -> None:
        import wandb

        self.run.log({f"eval/{t.name}/table": wandb.Table(columns=t.columns, data=t.rows),
                      f"eval/{t.name}/figure": wandb.Image(str(t.figure)), "global_step": t.step})

    def close(self, finished: bool) -> None:
        if not finished:
            self.run.mark_preempting()
        self.run.finish()


def mlflow_uri(out: Path) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in `out` (the training run's folder)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve() / 'mlflow.db'}"


class _Mlflow:
    """One MLflow run in `mlflow_uri(out)`; a new one gets the config as parameters."""

    def __init__(self, out: Path, run_id: str | None, params: dict | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(mlflow_uri(out))
        if run_id is not None:
            self.id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:   # a local store keeps its artifacts beside it, not in the working dir
            local = "MLFLOW_TRACKING_URI" not in os.environ
            exp_id = self.client.create_experiment(name, (out / "mlartifacts").resolve().as_uri() if local
                                                   else None)
        else:
            exp_id = experiment.experiment_id
        self.id = self.client.create_run(exp_id, run_name=out.name).info.run_id
        flat = [Param(k, str(v)) for k, v in _flatten(params or {}).items()]
        for i in range(0, len(flat), 100):   # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.id, params=flat[i:i + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def log_eval(self, t: EvalTable) -> None:
        self.client.log_table(self.id, {c: [r[i] for r in t.rows] for i, c in enumerate(t.columns)},
                              f"{t.name}/table.json")
        self.client.log_artifact(self.id, str(t.figure), t.name)

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.id, "FINISHED" if finished else "KILLED")


BACKENDS = {"wandb": _Wandb, "mlflow": _Mlflow}
TRACKER_NAMES = tuple(BACKENDS)   # train.loggers' names besides tensorboard; each its pip package's name


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"optim": {"epochs": 30}} -> {"optim.epochs": 30}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


class Trackers:
    """The external tracker runs of one training run (rank 0), each with the last step it got.
    `before`: {tracker: the last step an earlier process sent to the run}; only later steps go."""

    def __init__(self, out: Path, runs: dict, before: dict[str, int]):
        self.out, self.runs, self.before, self.last = out, runs, before, dict(before)

    def ids(self) -> dict[str, str]:
        """{tracker: run id}: what the checkpoint keeps."""
        return {name: r.id for name, r in self.runs.items()}

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Send `scalars` at trainer step `step` to each run that has not had a later step (a run
        resumed from an older checkpoint trains those steps again: their first points stay). Equal
        steps in one process are a step window and its epoch record."""
        sent = False
        for name, r in self.runs.items():
            if step > self.before.get(name, -1) and step >= self.last.get(name, -1):
                r.log(scalars, step)
                self.last[name], sent = step, True
        if sent:
            write_text(self.out / STATE, json.dumps({n: {"id": r.id, "step": self.last.get(n, -1)}
                                                     for n, r in self.runs.items()}))

    def close(self, finished: bool) -> None:
        """End every run: finished, or stopped to be resumed (preempted)."""
        for r in self.runs.values():
            r.close(finished)


def open_trackers(cfg: Config, saved: dict[str, str], commit: str) -> Trackers | None:
    """The runs of cfg.train.loggers' W&B / MLflow: `saved` ({tracker: run id}, the checkpoint's)
    continued, the others new with the resolved config and `commit` as parameters. None if neither."""
    names = [n for n in cfg.train.loggers if n in BACKENDS]
    if not names:
        return None
    out = Path(cfg.train.output_dir)
    try:
        state = json.loads((out / STATE).read_text())
    except FileNotFoundError:
        state = {}
    params = {**config_to_dict(cfg), "commit": commit}
    runs, before = {}, {}
    for name in dict.fromkeys(names):
        run_id = saved.get(name)
        runs[name] = BACKENDS[name](out, run_id, None if run_id else params)
        if run_id is not None and state.get(name, {}).get("id") == run_id:
            before[name] = state[name]["step"]
    return Trackers(out, runs, before)


def log_eval(name: str, run_dir: Path, run_id: str, table: EvalTable) -> None:
    """Add eval.py's `table` to the training run's tracker run `run_id` (found beside `run_dir`)."""
    run = BACKENDS[name](run_dir, run_id, None)
    run.log_eval(table)
    run.close(finished=True)
