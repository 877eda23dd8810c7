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


def init_distributed(backend: str | None = None, timeout_min: int = 30) -> DistInfo:
    """Initialise torch.distributed if launched with several processes; pick this rank's device.

    NCCL when CUDA is available, gloo otherwise (CPU tests, laptops).
    """
    launcher, rank, local_rank, world_size = detect_launcher()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size > 1:
        if launcher == "slurm":
            os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ["SLURM_JOB_NODELIST"]))
            # Port derived from the job id so two jobs sharing a node do not collide.
            os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
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
