"""What builds a run from the floors below it (rotnet/, then pipelines/ and models/, then probes/): the
config resolved once, then the run built from it, for every entry point.

    cfg = resolve(load_config(path, overrides), info, require=("train",))   # train.py, the benchmarks
    run = build_run(cfg, info, RunLogger(out, info.is_main))   # train.py: with its loaders and kNN monitor
    run = build_run(cfg, info, logger, loaders=False)          # the benchmarks: batches of their own
    cfg = with_data_root(cfg, require=("train", "val"))   # eval.py (its batch and precision are flags)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models import build_model
from pipelines import batch_preparer, class_labels_missing, rotation_loaders
from pipelines.sample_data import ensure_sample_data
from probes.knn import KnnMonitor
from rotnet.config import Config, ConfigError, override, resolve_batch
from rotnet.distributed import DistInfo, amp_args, place, resolve_precision
from rotnet.preemption import StopFlag
from rotnet.progress import log
from rotnet.schedule import StepSchedule, build_optimizer

# The config resolved once: what a run derives from cfg and its machine (the sample-data root, the batch
# per rank, the precision) is filled in before anything is written. A Config is frozen, so nothing
# changes it afterwards; config.yaml and the checkpoints store the resolved one.


def with_data_root(cfg: Config, require: tuple[str, ...] = ()) -> Config:
    """cfg with data.root set (an empty one: the built-in sample data); ConfigError if a `require`d
    split folder is missing, before anything is written."""
    root = cfg.data.root or str(ensure_sample_data(seed=cfg.data.sample_seed))
    for split in require:
        if not (Path(root) / split).is_dir():
            raise ConfigError(f"data.root={root!r} has no {split}/ folder; set "
                              "data.root=/path/to/dataset (ImageNet layout: SPLIT/CLASS/IMAGE.JPEG)")
    return override(cfg, {"data.root": root})


def resolve(cfg: Config, info: DistInfo, require: tuple[str, ...] = ()) -> Config:
    """cfg as a training run on `info`'s ranks and device carries it: data.root (`with_data_root`),
    both batch sizes (`resolve_batch`), train.precision without 'auto'."""
    cfg = with_data_root(cfg, require)
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
        raise ValueError("build_run takes a resolved config: cfg = run_builder.resolve(cfg, info)")
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
    model = place(raw, info, cfg.train.channels_last)
    if cfg.train.compile:
        model = torch.compile(model)
    scale = cfg.optim.global_batch_size / cfg.optim.ref_batch if cfg.optim.scale_lr else 1.0
    schedule = StepSchedule(cfg.optim.schedule, scale, cfg.optim.warmup_epochs)
    return Run(cfg, info, model, raw, build_optimizer(raw.parameters(), schedule(0), cfg.optim),
               torch.amp.GradScaler(info.device.type, enabled=cfg.train.precision == "fp16"), schedule,
               batch_preparer(cfg, cfg.train.precision), amp_args(cfg.train.precision, info.device), logger,
               StopFlag(info), loader, val_loader, monitor)
