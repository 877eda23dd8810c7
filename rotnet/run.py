"""Building a run: model, DDP, optimizer, scaler, schedule, in one place for every entry point.

    run = build_run(cfg, info, RunLogger(out, info.is_main))   # train.py and the benchmarks
    optimizer = build_optimizer(params, lr, cfg.probe)          # eval.py's probes
    model = place(raw, info, channels_last=True)               # channels_last, cuDNN autotune, DDP
    prepare = batch_preparer(cfg, precision)                   # loader images -> model input

benchmarks/train_throughput.py times `train.train_one_epoch` on a `build_run` result, so it
measures exactly the model, optimizer and lr that train.py runs.
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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> what this device computes fast: bf16 on CUDA with bf16 (Ampere and newer) and on
    CPUs with native bf16 (AVX512-BF16 / AMX), fp16 on older GPUs, fp32 on other CPUs.

    Why not bf16 everywhere: without native support oneDNN emulates it, and a RotNet AlexNet
    step measured ~30x slower than fp32 on a 2-core Zen 3 EPYC (docs/benchmarks.md).
    """
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
    """images -> prepare_batch(images, cfg.data, cfg.train.channels_last, dtype) for a model run at
    `precision`: float32 for fp32; under autocast (bf16, fp16) dtype=None, so the loader's float16
    batch is not cast to float32 only for autocast's first op to cast it back."""
    dtype = torch.float32 if precision == "fp32" else None
    return partial(prepare_batch, data=cfg.data, channels_last=cfg.train.channels_last, dtype=dtype)


def build_optimizer(params, lr: float, hp) -> torch.optim.SGD:
    """SGD with hp's momentum, nesterov and weight_decay (cfg.optim or cfg.probe).

    Fused (one kernel for the whole update) where this torch build has it for the device,
    else foreach: the same update, a few kernels per parameter group.
    """
    params = list(params)   # may be a generator: the fallback needs it again
    sgd = dict(lr=lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay)
    try:
        return torch.optim.SGD(params, fused=True, **sgd)
    except (RuntimeError, TypeError):
        return torch.optim.SGD(params, foreach=True, **sgd)


def place(raw: nn.Module, info: DistInfo, channels_last: bool) -> nn.Module:
    """Put `raw` (already on info.device) in its memory format and wrap it in DDP when several
    ranks run; returns the module to call (`raw` itself in a single process).

    DDP syncs only the parameters that require grad: for probes, the heads (and the trunk
    when fine-tuning).
    """
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # input shapes are fixed: autotune each conv once
    if channels_last:
        raw.to(memory_format=torch.channels_last)
    if not info.distributed:
        return raw
    return DistributedDataParallel(
        raw, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def data_root(cfg: Config, require: tuple[str, ...] = ()) -> Path:
    """cfg.data.root, an empty one first set to the built-in sample data (made once, cached).

    require: sub-folders (splits, e.g. cfg.data.train_dir) that must exist; a ConfigError naming
    data.root and the first missing one otherwise, so a wrong root fails before anything is written.
    """
    if not cfg.data.root:
        cfg.data.root = str(ensure_sample_data(seed=cfg.data.sample_seed))
    root = Path(cfg.data.root)
    for split in require:
        if not (root / split).is_dir():
            raise ConfigError(f"data.root={cfg.data.root!r} has no {split}/ folder; set "
                              "data.root=/path/to/dataset (ImageNet layout: SPLIT/CLASS/IMAGE.JPEG)")
    return root


def build_run(cfg: Config, info: DistInfo, logger) -> Run:
    """The RotNet, wrapped as asked, with its optimizer, scaler and lr schedule, at step 0.

    Same initial weights on every rank (seeded by train.seed). The lr table is scaled by
    global batch / optim.ref_batch when optim.scale_lr is set. train.precision 'auto' and the
    per-GPU (or global) batch are resolved here, in cfg itself, so config.yaml and checkpoints
    record what ran; ConfigError when the batch does not divide over info.world_size.
    """
    resolve_batch(cfg, info.world_size)
    if cfg.train.sync_bn and info.device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); "
                          "set train.sync_bn=false")
    cfg.train.precision = resolve_precision(cfg.train.precision, info.device)   # the resolved config says what ran
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
