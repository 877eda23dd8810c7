#!/usr/bin/env python
"""RotNet self-supervised pretraining (Gidaris, Singh, Komodakis, ICLR 2018).

Each step takes N images per GPU, rotated by each of K angles (0, 90, 180, 270) by the pipeline;
the network says which rotation it sees: (K*N, 3, H, W) -> (K*N, K) logits, cross-entropy against
labels 0..K-1. Row K*i + r is image i rotated by rotations[r].

    python train.py                                   # built-in sample data, CPU or one GPU
    torchrun --nproc_per_node=8 train.py --config configs/imagenet_alexnet.yaml data.root=/data/imagenet
    srun python train.py --config ...                 # SLURM, one task per GPU (see slurm/)

A run started again with the same train.output_dir resumes from its checkpoint. The benchmarks build
their runs with this file's `resolve` and `build_run`, so they time the run train.py trains.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models import build_model
from pipelines import batch_preparer, class_labels_missing, rotation_loaders, with_data_root
from probes.knn import KnnMonitor
from rotnet.atomic import DiskFullError
from rotnet.checkpoint import check_compatible, find_checkpoint, git_commit, load_checkpoint, save_checkpoint
from rotnet.cli import ArgumentParser, InputError, fail
from rotnet.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    override,
    resolve_batch,
    save_config,
)
from rotnet.distributed import (
    DistInfo,
    all_reduce_sum,
    amp_args,
    cleanup,
    from_rank0,
    init_distributed,
    on_rank0,
    place,
    resolve_precision,
)
from rotnet.epoch_log import DivergedError, EpochLog, diverged
from rotnet.preemption import REQUEUE_EXIT_CODE, Preempted, StopFlag
from rotnet.progress import RunLogger, log, open_trackers, require, setup_logging
from rotnet.runlock import own_folder
from rotnet.schedule import StepSchedule, build_optimizer, due_after

# A checkpoint is refused (with the differences listed) when these differ from the run's config.
ARCH_KEYS = ("model.arch", "model.width", "model.num_blocks", "data.rotations", "data.crop_size")


def get_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/sample.yaml",
                   help="YAML config (default: configs/sample.yaml, the built-in sample data). "
                        "Start from configs/imagenet_alexnet.yaml for the paper's ImageNet run.")
    p.add_overrides("optim.epochs=5 data.root=/data/imagenet train.output_dir=runs/x")
    return p.parse_intermixed_args(argv)


# The config resolved once: what a run derives from cfg and its machine (the sample-data root, the batch
# per rank, the precision) is filled in before anything is written. A Config is frozen, so nothing
# changes it afterwards; config.yaml and the checkpoints store the resolved one.


def resolve(cfg: Config, info: DistInfo, splits: tuple[str, ...] = ()) -> Config:
    """cfg as a training run on `info`'s ranks and device carries it: data.root (`with_data_root`, which
    refuses a root without the folders `splits`), both batch sizes (`resolve_batch`), train.precision
    without 'auto'."""
    cfg = with_data_root(cfg, require=splits)
    if cfg.train.sync_bn and info.device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); "
                          "set train.sync_bn=false")
    precision = resolve_precision(cfg.train.precision, info.device)
    return resolve_batch(override(cfg, {"train.precision": precision}), info.world_size)


# The run: model, DDP, optimizer, scaler and schedule, and the loaders and kNN monitor that feed and
# watch it, built from the resolved config.


@dataclass
class Run:
    """What every step needs and that outlives an epoch (a plain record, not a trainer class)."""
    cfg: Config                 # resolved (`resolve`): never 'auto', both batch sizes, data.root
    info: DistInfo
    model: nn.Module            # DDP-wrapped (and compiled) when asked; `raw` is the unwrapped one
    raw: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: StepSchedule
    prepare: Callable[[torch.Tensor], torch.Tensor]   # `batch_preparer` at train.precision
    amp: dict                   # torch.autocast(**amp) at train.precision (rotnet.distributed.amp_args)
    logger: object              # rotnet.progress.RunLogger, or a stand-in with its methods
    stop: StopFlag
    loader: object = None       # the train split's rotation batches (pipelines); None: loaders=False
    val_loader: object = None   # held-out rotation batches (train.eval_rotation_every), or None
    monitor: KnnMonitor | None = None   # kNN top-1 during pretraining (train.monitor_every), or None
    step: int = 0               # optimizer steps taken in total
    checkpoint: str = "none yet"   # the last good checkpoint (path, epoch, step), for error messages


def build_run(cfg: Config, info: DistInfo, logger, loaders: bool = True) -> Run:
    """The RotNet (same seeded weights on every rank), wrapped as asked, with its optimizer, scaler
    and lr schedule, at step 0; with `loaders`, also its kNN monitor and its train and val loaders
    (loaders=False: the benchmarks, which feed batches of their own). `cfg` is `resolve`'s for `info`."""
    if cfg.train.precision == "auto" or not cfg.optim.global_batch_size:
        raise ValueError("build_run takes a resolved config: cfg = resolve(cfg, info)")
    raw = build_model(cfg, cfg.train.seed).to(info.device)
    if cfg.train.sync_bn and info.distributed:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    monitor = loader = val_loader = None
    if loaders:
        every = cfg.train.monitor_every
        unlabelled = every and class_labels_missing(cfg.data, str(Path(cfg.data.root) / cfg.data.val_dir))
        if unlabelled:   # pretraining needs no labelled val split: run without the monitor
            log.warning(f"the kNN monitor is off for this run (train.monitor_every={every}): {unlabelled}")
        elif every:
            monitor = KnnMonitor(cfg, info, raw.trunk)   # it checks train.monitor_layers on the trunk
        loader, val_loader = rotation_loaders(cfg, info)
        if val_loader is None and cfg.train.eval_rotation_every:   # a typo in data.val_dir, say
            val = Path(cfg.data.root) / cfg.data.val_dir
            log.warning(f"no held-out rotation accuracy (train.eval_rotation_every="
                        f"{cfg.train.eval_rotation_every}): {val} is not a folder")
    model = place(raw, info, cfg.train.channels_last)
    if cfg.train.compile:
        model = torch.compile(model)
    scale = cfg.optim.global_batch_size / cfg.optim.ref_batch if cfg.optim.scale_lr else 1.0
    schedule = StepSchedule(cfg.optim.schedule, scale, cfg.optim.warmup_epochs)
    return Run(cfg, info, model, raw, build_optimizer(raw.parameters(), schedule(0), cfg.optim),
               torch.amp.GradScaler(info.device.type, enabled=cfg.train.precision == "fp16"), schedule,
               batch_preparer(cfg, cfg.train.precision), amp_args(cfg.train.precision, info.device), logger,
               StopFlag(info), loader, val_loader, monitor)


def steps_allowed(run: Run) -> float:
    """Steps that train.max_steps still allows (math.inf for 0: no limit)."""
    return run.cfg.train.max_steps - run.step if run.cfg.train.max_steps else math.inf


def train_one_epoch(run: Run, loader, epoch: int, start_step: int) -> dict:
    """Train the rest of one epoch from `start_step`; returns its stats over all ranks.
    Raises Preempted after a stop signal. Host syncs only at logging windows (rotnet.epoch_log)."""
    cfg, model = run.cfg, run.model
    model.train()
    steps = len(loader)
    last = min(steps, start_step + steps_allowed(run)) - 1   # the epoch's last step, or train.max_steps'
    epoch_log = EpochLog(run, epoch, steps)
    run.logger.start_epoch(epoch, total=steps, initial=start_step)
    i = start_step - 1          # the last step done
    for i, (images, labels) in islice(enumerate(loader, start=start_step), max(0, last + 1 - start_step)):
        epoch_log.batch_arrived()
        lr = run.schedule(epoch + i / steps)
        for g in run.optimizer.param_groups:
            g["lr"] = lr

        x = run.prepare(images)                                        # (K*N, 3, H, W) normalised
        with torch.autocast(**run.amp):
            logits = model(x)                                          # (K*N, K)
        loss = F.cross_entropy(logits.float(), labels)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.step += 1

        epoch_log.add(loss, logits, labels)
        window_end = (i + 1) % cfg.train.log_every == 0 or i == last   # the epoch's last step always logs
        if window_end:
            epoch_log.close_window(i, lr)
        if run.stop.should_stop(window_end):   # on an epoch's last step the resume point is the next epoch
            raise Preempted(epoch + 1, 0) if i + 1 == steps else Preempted(epoch, i + 1)
        epoch_log.step_done()
    lr = run.schedule(epoch + i / max(steps, 1))
    return epoch_log.epoch_stats(i, start_step, lr, complete=last == steps - 1)


@torch.no_grad()
def evaluate_rotation(run: Run, loader) -> float:
    """Rotation accuracy on held-out images (data.val_dir, eval recipe), over all ranks."""
    run.raw.eval()
    counts = torch.zeros(2, device=run.info.device, dtype=torch.float64)
    for images, labels in loader:           # validation batches hold real images only (trimmed)
        with torch.autocast(**run.amp):
            logits = run.raw(run.prepare(images))
        counts[0] += (logits.argmax(1) == labels).sum()
        counts[1] += labels.numel()
    all_reduce_sum(counts, run.info)
    return counts[0].item() / max(counts[1].item(), 1)


def save(run: Run, epoch: int, epoch_step: int, failed: Exception | None = None) -> None:
    """Collective: gathers every rank's reader state; rank 0 writes atomically, and every rank raises
    what stopped it: a full disk (the last good checkpoint kept) or non-finite weights (never saved).
    `failed`: rank 0's error before the save (a full disk writing the log): nothing is written."""
    loader_states = [run.loader.state_dict()] * run.info.world_size
    error = failed
    if run.info.distributed:
        dist.all_gather_object(loader_states, loader_states[0])
    if run.info.is_main and error is None:
        state = {
            "model": run.raw.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "epoch": epoch, "epoch_step": epoch_step, "step": run.step,
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if run.info.device.type == "cuda" else None},
            "loader": loader_states, "world_size": run.info.world_size,
            "config": config_to_dict(run.cfg), "commit": git_commit(),
            "trackers": run.logger.trackers.ids() if run.logger.trackers is not None else {},
        }
        try:
            if not all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point()):
                raise diverged("the weights are not finite", run, epoch, epoch_step,
                               run.optimizer.param_groups[0]["lr"])
            path = save_checkpoint(state, run.cfg.train.output_dir, run.cfg.train.keep_last,
                                   numbered=bool(run.cfg.train.save_every and epoch_step == 0
                                                 and epoch % run.cfg.train.save_every == 0))
        except (DiskFullError, DivergedError) as e:
            error = e
        else:
            run.checkpoint = f"{path} (epoch {epoch}, step in epoch {epoch_step})"
            log.info(f"checkpoint: {path} (epoch {epoch}, step in epoch {epoch_step}, total step {run.step})")
    if isinstance(error, DiskFullError):
        error = DiskFullError(f"{error}; the last good checkpoint is kept: {run.checkpoint}")
    error, run.checkpoint = from_rank0((error, run.checkpoint), run.info)
    if error is not None:
        raise error


def resume(run: Run) -> tuple[int, int, dict]:
    """Load train.output_dir's checkpoint if any; returns (epoch, step inside that epoch, its tracker
    run ids {tracker: id})."""
    path = find_checkpoint(run.cfg.train.output_dir)
    if path is None:
        return 0, 0, {}
    ckpt = load_checkpoint(path, map_location=run.info.device)
    check_compatible(path, ckpt["config"], config_to_dict(run.cfg), ARCH_KEYS)
    run.raw.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.step = ckpt["step"]
    torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
    if ckpt["rng"]["cuda"] is not None and run.info.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
    epoch, epoch_step = ckpt["epoch"], ckpt["epoch_step"]
    run.checkpoint = f"{path} (epoch {epoch}, step in epoch {epoch_step})"
    if ckpt["world_size"] == run.info.world_size:
        run.loader.load_state_dict(ckpt["loader"][run.info.rank])
        if epoch_step >= len(run.loader):   # older checkpoints saved "epoch e, step = len" at the end
            epoch, epoch_step = epoch + 1, 0
    elif epoch_step:
        log.warning(f"world size changed ({ckpt['world_size']} -> {run.info.world_size}): "
                    f"epoch {epoch} restarts from its first step with a fresh data order")
        epoch_step = 0
    log.info(f"resumed from {path}: epoch {epoch}, step in epoch {epoch_step}, total step {run.step}")
    return epoch, epoch_step, ckpt.get("trackers", {})


def train_loop(run: Run, start_epoch: int, start_step: int) -> None:
    """Epochs from `start_epoch` (at `start_step` inside it) to the end; checkpoint after each.
    The kNN monitor's time is logged as knn_time_s, apart from the epoch's time_s."""
    cfg, logger, loader, monitor = run.cfg, run.logger, run.loader, run.monitor
    for epoch in range(start_epoch, cfg.optim.epochs):
        if steps_allowed(run) <= 0:
            break
        loader.set_epoch(epoch)
        first = start_step if epoch == start_epoch else 0
        stats = train_one_epoch(run, loader, epoch, first)
        rot_due = due_after(epoch, cfg.train.eval_rotation_every, cfg.optim.epochs)
        if run.val_loader is not None and stats["complete"] and rot_due:
            stats["heldout_rot_acc"] = evaluate_rotation(run, run.val_loader)
        if monitor is not None and stats["complete"] and monitor.due(epoch):
            t0 = time.perf_counter()
            stats["knn_top1"] = monitor(run.raw.trunk)   # {layer: top-1 %}
            stats["knn_time_s"] = round(time.perf_counter() - t0, 2)
            if logger.bar is not None:   # the epoch's bar is still open: its last word is the kNN top-1
                shown = [logger.bar.postfix, _show("knn_top1", stats["knn_top1"])]
                logger.bar.set_postfix_str(", ".join(filter(None, shown)))
        stats["global_batch"] = cfg.optim.global_batch_size
        logged = None
        try:
            logger.end_epoch(stats)
        except DiskFullError as e:   # rank 0's log line: every rank stops at the save below, together
            logged = e
        log.info(" ".join(_show(k, v) for k, v in stats.items()))
        done = stats["complete"]
        save(run, epoch + 1 if done else epoch, epoch_step=0 if done else first + stats["steps"],
             failed=logged)


def _show(key: str, value) -> str:
    """One stat of the epoch's log line: 'loss=0.1234', 'knn_top1[conv3]=41.2'."""
    if isinstance(value, dict):
        return " ".join(_show(f"{key}[{k}]", v) for k, v in value.items())
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


def main(argv=None) -> None:
    args = get_args(argv)
    try:
        with ExitStack() as held:   # the output folder's lock, released however train ends
            train(args, held)
    except InputError as e:   # bad input, a busy folder, a full disk, a diverged loss: one line, exit 2
        fail(e)
    except Preempted as stop:
        log.info(f"stop signal received: checkpoint written at epoch {stop.epoch} step {stop.epoch_step}; "
                 f"exiting with code {REQUEUE_EXIT_CODE} (requeue)")
        sys.exit(REQUEUE_EXIT_CODE)


def train(args: argparse.Namespace, held: ExitStack) -> None:
    """Set up, resume, train to the end; a stop signal ends it with Preempted, checkpoint written.
    Rank 0 holds the output folder's lock in `held` (rotnet.runlock) before anything is written."""
    cfg = load_config(args.config, args.overrides)   # bad input fails before the output folder is touched
    require(cfg.train.loggers, "train.loggers")
    info = init_distributed()
    cfg = resolve(cfg, info, splits=(cfg.data.train_dir,))   # the config this run carries, never changed
    out = Path(cfg.train.output_dir)
    def claim_folder():
        held.enter_context(own_folder(out, "train.output_dir", cfg.train.lock))
    on_rank0(claim_folder, info)   # a busy folder or a full disk stops every rank
    setup_logging(info.is_main, out)
    run = build_run(cfg, info, RunLogger(out, info.is_main, tensorboard="tensorboard" in cfg.train.loggers))
    start_epoch, start_step, tracker_ids = resume(run)   # a checkpoint it refuses is left untouched

    on_rank0(lambda: save_config(cfg, out / "config.yaml"), info)
    if info.is_main:
        log.info("resolved config:\n" + "\n".join(f"  {s}: {v}" for s, v in config_to_dict(cfg).items()))
        device = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
        log.info(f"commit {git_commit()} | launcher {info.launcher} | world size {info.world_size} | "
                 f"device {device} | precision {cfg.train.precision} | data backend {run.loader.backend}")
        n, k = cfg.optim.batch_size_per_gpu, len(cfg.data.rotations)
        lrs = ", ".join(f"{lr:.4g} from epoch {e:g}" for e, lr in run.schedule.table)
        scaled = f" (optim.schedule x {run.schedule.scale:.3g}, optim.scale_lr)" if cfg.optim.scale_lr else ""
        params = sum(p.numel() for p in run.raw.parameters()) / 1e6
        log.info(f"batch: global {cfg.optim.global_batch_size} original images = {n}/GPU x {info.world_size} "
                 f"GPU(s); x {k} rotations = {n * k} rotated samples/GPU; lr {lrs}{scaled}; "
                 f"{len(run.loader)} steps/epoch; {params:.2f}M params")
        run.logger.trackers = open_trackers(cfg, tracker_ids, git_commit())   # W&B / MLflow: the same run

    try:
        train_loop(run, start_epoch, start_step)
    except Preempted as stop:   # every rank stopped after the same step: its resume point goes to disk
        save(run, stop.epoch, stop.epoch_step)
        close(run, finished=False)
        raise
    close(run, finished=True)
    log.info(f"done: {cfg.train.output_dir}")


def close(run: Run, finished: bool) -> None:
    """End a run that finished or was stopped (a crash leaves the process group to the launcher)."""
    run.logger.close(finished)
    run.loader = run.val_loader = run.monitor = None   # for cleanup() to free their DALI pipelines now
    cleanup(run.info)


if __name__ == "__main__":
    main()
