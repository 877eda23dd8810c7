"""Building a run from a resolved config: model, DDP, optimizer, scaler, schedule, in one place for
every entry point.

    cfg = resolve(cfg, info, require=(cfg.data.train_dir,))      # launch.resolve
    run = build_run(cfg, info, RunLogger(out, info.is_main))   # train.py and the benchmarks
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from models import build_model
from pipelines import prepare_batch
from rotnet.config import Config
from rotnet.distributed import DistInfo, place
from rotnet.preemption import StopFlag
from rotnet.schedule import StepSchedule, build_optimizer


@dataclass
class Run:
    """What every step needs and that outlives an epoch (a plain record, not a trainer class)."""
    cfg: Config                 # resolved (launch.resolve): never 'auto', both batch sizes, data.root
    info: DistInfo
    model: nn.Module            # DDP-wrapped (and compiled) when asked; `raw` is the unwrapped one
    raw: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: StepSchedule
    prepare: Callable[[torch.Tensor], torch.Tensor]   # `batch_preparer` at train.precision
    logger: object              # rotnet.progress.RunLogger, or a stand-in with its methods
    stop: StopFlag
    step: int = 0               # optimizer steps taken in total


def batch_preparer(cfg: Config, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Loader images -> model input at `precision`; under autocast the float16 batch is not upcast."""
    dtype = torch.float32 if precision == "fp32" else None
    return partial(prepare_batch, data=cfg.data, channels_last=cfg.train.channels_last, dtype=dtype)


def build_run(cfg: Config, info: DistInfo, logger) -> Run:
    """The RotNet (same seeded weights on every rank), wrapped as asked, with its optimizer, scaler
    and lr schedule, at step 0. `cfg` is launch.resolve.resolve's for `info`."""
    if cfg.train.precision == "auto" or not cfg.optim.global_batch_size:
        raise ValueError("build_run takes a resolved config: cfg = launch.resolve.resolve(cfg, info)")
    raw = build_model(cfg, cfg.train.seed).to(info.device)
    if cfg.train.sync_bn and info.distributed:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    model = place(raw, info, cfg.train.channels_last)
    if cfg.train.compile:
        model = torch.compile(model)
    scale = cfg.optim.global_batch_size / cfg.optim.ref_batch if cfg.optim.scale_lr else 1.0
    schedule = StepSchedule(cfg.optim.schedule, scale, cfg.optim.warmup_epochs)
    return Run(cfg, info, model, raw, build_optimizer(raw.parameters(), schedule(0), cfg.optim),
               torch.amp.GradScaler(info.device.type, enabled=cfg.train.precision == "fp16"), schedule,
               batch_preparer(cfg, cfg.train.precision), logger, StopFlag(info))
