"""Building a run: model, DDP, optimizer, scaler, schedule, in one place for every entry point.

    run = build_run(cfg, info, RunLogger(out, info.is_main))   # train.py and the benchmarks
    optimizer = build_optimizer(params, lr, cfg.probe)          # eval.py's probes
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models import build_model
from pipelines import prepare_batch
from pipelines.sample_data import ensure_sample_data
from rotnet.config import Config, ConfigError, resolve_batch
from rotnet.distributed import DistInfo
from rotnet.preemption import StopFlag
from rotnet.progress import log
from rotnet.schedule import StepSchedule


@dataclass
class Run:
    """What every step needs and that outlives an epoch (a plain record, not a trainer class)."""
    cfg: Config
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
    checkpoint: str = "none yet"   # the last good checkpoint (path, epoch, step), for error messages


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where native, else fp16 on CUDA, fp32 on CPU (emulated bf16 is tens of times
    slower; docs/benchmarks.md)."""
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else ("fp16" if device.type == "cuda" else "fp32")
    if precision == "bf16" and not native:
        log.warning(f"precision bf16 on a {device.type} without native bf16: it is emulated and can be "
                    "tens of times slower than fp32; use precision auto (train.precision=auto, "
                    "eval.py --precision auto)")
    return precision


def autocast(precision: str, device: torch.device):
    """Mixed-precision context for train.precision / eval --precision: bf16 | fp16 | fp32 (none)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def batch_preparer(cfg: Config, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Loader images -> model input at `precision`; under autocast the float16 batch is not upcast."""
    dtype = torch.float32 if precision == "fp32" else None
    return partial(prepare_batch, data=cfg.data, channels_last=cfg.train.channels_last, dtype=dtype)


def build_optimizer(params, lr: float, hp) -> torch.optim.SGD:
    """SGD with hp's momentum, nesterov and weight_decay (cfg.optim or cfg.probe); fused where the
    torch build has it for the device, else foreach (the same update)."""
    params = list(params)   # may be a generator: the fallback needs it again
    sgd = dict(lr=lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay)
    try:
        return torch.optim.SGD(params, fused=True, **sgd)
    except (RuntimeError, TypeError):
        return torch.optim.SGD(params, foreach=True, **sgd)


def place(raw: nn.Module, info: DistInfo, channels_last: bool) -> nn.Module:
    """`raw` (on info.device) in its memory format, wrapped in DDP when several ranks run."""
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # input shapes are fixed: autotune each conv once
    if channels_last:
        raw.to(memory_format=torch.channels_last)
    if not info.distributed:
        return raw
    return DistributedDataParallel(raw, device_ids=None if info.device.type == "cpu" else [info.device.index])


def data_root(cfg: Config, require: tuple[str, ...] = ()) -> Path:
    """cfg.data.root (an empty one set to the built-in sample data); ConfigError if a `require`d
    split folder is missing, before anything is written."""
    if not cfg.data.root:
        cfg.data.root = str(ensure_sample_data(seed=cfg.data.sample_seed))
    root = Path(cfg.data.root)
    for split in require:
        if not (root / split).is_dir():
            raise ConfigError(f"data.root={cfg.data.root!r} has no {split}/ folder; set "
                              "data.root=/path/to/dataset (ImageNet layout: SPLIT/CLASS/IMAGE.JPEG)")
    return root


def build_run(cfg: Config, info: DistInfo, logger) -> Run:
    """The RotNet (same seeded weights on every rank), wrapped as asked, with its optimizer, scaler
    and lr schedule, at step 0. Resolves the batch and train.precision in cfg: config.yaml says what ran."""
    resolve_batch(cfg, info.world_size)
    if cfg.train.sync_bn and info.device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); "
                          "set train.sync_bn=false")
    cfg.train.precision = resolve_precision(cfg.train.precision, info.device)
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
