"""The ranks, their device, and what it computes in. Process-group setup for torchrun, SLURM (srun
without torchrun) and single-process runs: `init_distributed()` returns the `DistInfo` that the rest
of the code reads ranks from; `place` puts a model on it (DDP across ranks). Mixed precision:
train.precision / eval --precision ('auto', bf16, fp16, fp32) resolved for the device, and its autocast."""
from __future__ import annotations

import datetime
import gc
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rotnet.cli import InputError, UsageError
from rotnet.progress import log


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    launcher: str = "single"      # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,7],cpu1' -> 'gpu003' (regex without scontrol)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^\[,]+)(?:\[([^\],-]+))?", nodelist)
    if not m:
        raise RuntimeError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    return m.group(1) + (m.group(2) or "")


def detect_launcher() -> tuple[str, int, int, int]:
    """(launcher, rank, local_rank, world_size) from torchrun's variables, else SLURM's, else single."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun", int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    # SLURM_NTASKS > 1: srun started all ranks; one task (e.g. the shell running torchrun) is single.
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm", int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"])
    return "single", 0, 0, 1


def ranks_on_node(launcher: str, local_rank: int) -> int:
    """Processes started on this node (LOCAL_WORLD_SIZE, or SLURM_STEP_TASKS_PER_NODE's entry)."""
    if launcher == "single":
        return 1
    if launcher == "torchrun":
        return int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    counts = []   # SLURM's compressed list: '8(x2),4' is 8, 8 and 4 tasks on nodes 0, 1, 2
    for part in os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(os.environ.get("SLURM_NODEID", 0))
    return max(counts[node] if node < len(counts) else 0, local_rank + 1)


def pick_device(launcher: str, local_rank: int) -> torch.device:
    """cuda:local_rank, or the CPU without CUDA. UsageError when a node has more ranks than GPUs
    (NCCL refuses two ranks on one GPU); with `srun --gpus-per-task` each task takes its first GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if launcher == "slurm" and os.environ.get("SLURM_GPUS_PER_TASK"):
        return torch.device("cuda", 0)
    ranks, gpus = ranks_on_node(launcher, local_rank), torch.cuda.device_count()
    if ranks > gpus:
        fits = "srun --ntasks-per-node" if launcher == "slurm" else "torchrun --nproc_per_node"
        plain = ", or on one GPU the script with plain `python`, no launcher" if gpus == 1 else ""
        raise UsageError(f"{ranks} ranks on this node but {gpus} GPU(s): start one rank per GPU "
                         f"({fits}={gpus}{plain}), keeping the run's optim.global_batch_size "
                         "(the per-GPU batch then grows)")
    return torch.device("cuda", local_rank)


def init_distributed() -> DistInfo:
    """Initialise torch.distributed (NCCL on CUDA, else gloo) when several processes run."""
    launcher, rank, local_rank, world_size = detect_launcher()
    device = pick_device(launcher, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        if launcher == "slurm":
            os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ["SLURM_JOB_NODELIST"]))
            port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000   # two jobs on a node differ
            os.environ.setdefault("MASTER_PORT", str(port))
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                world_size=world_size, rank=rank,
                                timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, launcher=launcher)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def from_rank0(obj, info: DistInfo):
    """Rank 0's `obj` (picklable) on every rank; a collective that every rank calls. How the other
    ranks learn that rank 0 refused to go on (a busy folder, a full disk) instead of waiting for it."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(work, info: DistInfo) -> None:
    """Run `work()` on rank 0 only; bad input it raises there (a busy folder, a full disk) is raised
    on every rank. A collective that every rank calls: no rank waits for a rank 0 that stopped."""
    error = None
    if info.is_main:
        try:
            work()
        except InputError as e:
            error = e
    if (error := from_rank0(error, info)) is not None:
        raise error


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over ranks in place and return it."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def place(raw: nn.Module, info: DistInfo, channels_last: bool) -> nn.Module:
    """`raw` (on info.device) in its memory format, wrapped in DDP when several ranks run."""
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # input shapes are fixed: autotune each conv once
    if channels_last:
        raw.to(memory_format=torch.channels_last)
    if not info.distributed:
        return raw
    return DistributedDataParallel(raw, device_ids=None if info.device.type == "cpu" else [info.device.index])


def cleanup(info: DistInfo) -> None:
    # Loaders sit in reference cycles (a DALI pipeline and its read feed): free them now, in this
    # thread, not during interpreter teardown, where a DALI pipeline's threads can abort the process.
    gc.collect()
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------ mixed precision
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
