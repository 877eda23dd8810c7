"""Process-group setup for torchrun, SLURM (srun without torchrun) and single-process runs.

One entry point, `init_distributed()`, returns a `DistInfo`; everything else in the
code base reads rank/world size from it rather than from the environment.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rotnet.cli import UsageError


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
    """First host of a SLURM node list: 'gpu[003-005,7],cpu1' -> 'gpu003'.

    `scontrol show hostnames` is the authority; the regex is a fallback for containers
    where scontrol is not on PATH.
    """
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


def _env_int(name: str) -> int:
    return int(os.environ[name])


def detect_launcher() -> tuple[str, int, int, int]:
    """(launcher, rank, local_rank, world_size) from torchrun's variables, else SLURM's, else single."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun", _env_int("RANK"), int(os.environ.get("LOCAL_RANK", 0)), _env_int("WORLD_SIZE")
    # SLURM_PROCID is set for every srun task; SLURM_NTASKS > 1 means srun started all ranks itself.
    # A plain `sbatch` step with one task (e.g. the shell running torchrun) has NTASKS=1 and is single.
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm", _env_int("SLURM_PROCID"), _env_int("SLURM_LOCALID"), _env_int("SLURM_NTASKS")
    return "single", 0, 0, 1


def ranks_on_node(launcher: str, local_rank: int) -> int:
    """Processes started on this node: 1 without a launcher, torchrun's LOCAL_WORLD_SIZE, or this
    node's entry (SLURM_NODEID) of srun's SLURM_STEP_TASKS_PER_NODE; at least local_rank + 1."""
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
    """This rank's device: cuda:local_rank (one GPU per rank), or the CPU without CUDA.

    UsageError, before any process group exists, when a node starts more ranks than it has GPUs:
    NCCL refuses two ranks on one GPU, and each rank would die at start-up with an NCCL error.
    `srun --gpus-per-task` gives each task its own GPUs, so there every task takes its first one.
    """
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


def init_distributed(backend: str | None = None, timeout_min: int = 30) -> DistInfo:
    """Initialise torch.distributed if launched with several processes; pick this rank's device.

    NCCL when CUDA is available, gloo otherwise (CPU tests, laptops).
    """
    launcher, rank, local_rank, world_size = detect_launcher()
    device = pick_device(launcher, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        if launcher == "slurm":
            os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ["SLURM_JOB_NODELIST"]))
            # Port derived from the job id so two jobs sharing a node do not collide.
            port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
            os.environ.setdefault("MASTER_PORT", str(port))
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank,
                                timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, launcher=launcher)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op single process) and return it."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
