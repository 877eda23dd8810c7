"""Mixed precision: train.precision / eval --precision ('auto', bf16, fp16, fp32) and its autocast."""
from __future__ import annotations

import torch

from rotnet.progress import log


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


def amp_args(precision: str, device: torch.device) -> dict:
    """torch.autocast's arguments for train.precision / eval --precision: bf16 | fp16 | fp32 (off).
    Resolved once per run, so the training step calls `torch.autocast(**run.amp)` itself."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return {"device_type": device.type, "dtype": dtype, "enabled": dtype is not None}


def autocast(precision: str, device: torch.device):
    """Mixed-precision context for `precision` on `device` (the probes' forward passes)."""
    return torch.autocast(**amp_args(precision, device))
