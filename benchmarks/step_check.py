"""Correctness of train.py's step on a device: no host sync outside the logging window, flat memory.

    python benchmarks/step_check.py --device cuda --data DIR --config configs/imagenette_alexnet.yaml
    python benchmarks/step_check.py                      # CPU, built-in sample data, toy sizes below

1. Host syncs: --steps steps of `train.train_one_epoch` (after --warmup unchecked steps: cuDNN's
   autotuning and the first allocations happen once) must not make the host wait for the device
   outside the logging window (rotnet.epoch_log's close_window and epoch_stats, the stop check).
   CUDA: torch.cuda.set_sync_debug_mode("warn") outside the window, 0 inside; each warning is
   counted with the line that caused it. CPU (nothing syncs there): the calls that would sync on
   CUDA are counted instead, outside the window and outside the loader: Tensor.item, .tolist,
   .cpu, .numpy; and, the loader included, tensors built from Python values straight onto a
   device (torch.tensor / torch.as_tensor with device=).
2. Memory: --epochs whole epochs (at most --epoch-steps steps each); after each, torch's allocated
   and reserved bytes and nvidia-smi's used memory (DALI's own allocations included), flat within
   --tolerance of the first epoch's, since DALI users report GPU memory that grows every epoch.
   CPU: the process's RSS, reported only (the allocator and Python's heap drift by design).
Exit status 1 when a check fails. tests/benchmarks/test_step_check.py runs the CPU path.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402  (train.py: the step being checked)
from pipelines import build_rotation_loader  # noqa: E402
from rotnet.config import load_config, override  # noqa: E402
from rotnet.distributed import DistInfo  # noqa: E402
from rotnet.epoch_log import EpochLog  # noqa: E402
from rotnet.preemption import StopFlag  # noqa: E402
from rotnet.progress import RunLogger  # noqa: E402
from run_builder import Run, build_run, resolve  # noqa: E402


class SyncWatch:
    """Where the step is: "window" (the logging window: syncs allowed), "loader", or "step".
    `found` counts what would sync outside the window: 'what at file:line' -> calls."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.where = "step"
        self.found: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def inside(self, where: str):
        before, self.where = self.where, where
        if self.cuda and where == "window":
            torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            self.where = before
            if self.cuda and where == "window":
                torch.cuda.set_sync_debug_mode("warn")

    def window(self, fn):
        """The method `fn`, run inside the logging window."""
        def wrapped(*args, **kwargs):
            with self.inside("window"):
                return fn(*args, **kwargs)
        return wrapped

    def counted(self, what: str, fn, onto_device: bool = False):
        """`fn`, counted where it would sync on CUDA: in the step; with onto_device (a tensor built
        from Python values) in the loader too, when it is given a device."""
        def wrapped(*args, **kwargs):
            if onto_device:   # torch.tensor(data, *, device=), torch.as_tensor(data, dtype, device)
                device = kwargs.get("device", args[2] if len(args) > 2 else None)
                hit = self.where != "window" and device is not None
            else:
                hit = self.where == "step"
            if hit:
                caller = sys._getframe(1)
                self.found[f"{what} at {caller.f_code.co_filename}:{caller.f_lineno}"] += 1
            return fn(*args, **kwargs)
        return wrapped

    def batches(self, loader):
        """`loader` as train_one_epoch sees it, each batch fetched inside "loader"."""
        watch = self

        class Marked:
            set_epoch = loader.set_epoch

            def __len__(self):
                return len(loader)

            def __iter__(self):
                it = iter(loader)
                while True:
                    with watch.inside("loader"):
                        batch = next(it, None)
                    if batch is None:
                        return
                    yield batch
        return Marked()

    @contextlib.contextmanager
    def armed(self):
        """The sync debug mode (CUDA) or the counting patches (CPU) for the duration of the block."""
        with contextlib.ExitStack() as stack:
            watched = ((EpochLog, "close_window"), (EpochLog, "epoch_stats"), (StopFlag, "should_stop"))
            for cls, name in watched:
                stack.enter_context(mock.patch.object(cls, name, self.window(getattr(cls, name))))
            if self.cuda:
                caught = stack.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                stack.callback(self._count_warnings, caught)
                torch.cuda.set_sync_debug_mode("warn")
                stack.callback(torch.cuda.set_sync_debug_mode, 0)
            else:
                for name in ("item", "tolist", "cpu", "numpy"):
                    method = self.counted(f".{name}()", getattr(torch.Tensor, name))
                    stack.enter_context(mock.patch.object(torch.Tensor, name, method))
                for name in ("tensor", "as_tensor"):
                    build = self.counted(f"torch.{name}(..., device=)", getattr(torch, name), True)
                    stack.enter_context(mock.patch.object(torch, name, build))
            yield

    def _count_warnings(self, caught) -> None:
        for w in caught:
            if "synchroniz" in str(w.message):
                self.found[f"sync at {w.filename}:{w.lineno}"] += 1


def run_steps(run: Run, loader, steps: int, epoch: int) -> int:
    """`steps` steps of train.train_one_epoch over whole epochs from `epoch` (the last one cut by
    train.max_steps); returns the next epoch."""
    run.cfg = override(run.cfg, {"train.max_steps": run.step + steps})
    while run.step < run.cfg.train.max_steps:
        loader.set_epoch(epoch)
        train.train_one_epoch(run, loader, epoch, start_step=0)
        epoch += 1
    return epoch


def check_syncs(run: Run, loader, steps: int, warmup: int) -> tuple[collections.Counter, int]:
    """What would make the host wait outside the logging window in `steps` steps after `warmup`
    unchecked ones ('what at file:line' -> calls), and the next epoch."""
    epoch = run_steps(run, loader, warmup, epoch=0) if warmup else 0
    watch = SyncWatch(run.info.device)
    with watch.armed():
        epoch = run_steps(run, watch.batches(loader), steps, epoch)
    return watch.found, epoch


# ---------------------------------------------------------------------------- memory

def memory_now(device: torch.device) -> dict[str, int]:
    """Bytes in use: torch's allocated and reserved and nvidia-smi's used on CUDA; RSS on the CPU."""
    if device.type != "cuda":
        return {"RSS": int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
    torch.cuda.synchronize(device)
    out = {"torch allocated": torch.cuda.memory_allocated(device),
           "torch reserved": torch.cuda.memory_reserved(device)}
    uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}"   # the same GPU whatever the numbering
    smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                          "-i", uuid], capture_output=True, text=True)
    if smi.returncode == 0 and smi.stdout.strip().isdigit():
        out["nvidia-smi used"] = int(smi.stdout) * 2**20
    return out


def check_memory(run: Run, loader, args: argparse.Namespace, first_epoch: int) -> bool:
    """Memory after each of args.epochs epochs (at most args.epoch_steps steps each, 0: whole); on
    CUDA True when every figure stays within args.tolerance of the first epoch's."""
    rows, tolerance, epochs = [], args.tolerance, args.epochs
    for epoch in range(first_epoch, first_epoch + epochs):
        run_steps(run, loader, min(args.epoch_steps or len(loader), len(loader)), epoch)
        rows.append(memory_now(run.info.device))
        shown = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in rows[-1].items())
        print(f"memory after epoch {len(rows)}: {shown}", flush=True)
    growth = {k: max(r[k] for r in rows) / rows[0][k] - 1 for k in rows[0] if rows[0][k]}
    flat = all(g <= tolerance for g in growth.values())
    shown = ", ".join(f"{k} {g:+.1%}" for k, g in growth.items())
    if run.info.device.type != "cuda":
        print(f"memory over {epochs} epochs (CPU: reported, not checked): {shown}")
        return True
    verdict = "flat" if flat else "GROWS: not flat"
    print(f"memory over {epochs} epochs: {verdict} within {tolerance:.0%} of epoch 1: {shown}")
    return flat


# ---------------------------------------------------------------------------- main

def get_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--config", default="configs/sample.yaml", help="the run's config (default: sample run)")
    ap.add_argument("--data", default="", help="ImageNet-layout folder with train/ (default: the "
                                               "config's data.root, else the built-in sample data)")
    ap.add_argument("--steps", type=int, default=20, help="checked steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="unchecked steps first (default 3)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the memory check (default 3; 0: none)")
    ap.add_argument("--epoch-steps", type=int, default=0,
                    help="at most this many steps per memory epoch (default 0: whole epochs, where DALI "
                         "resets; cap it on large data sets)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="memory growth allowed (default 0.05: 5%%)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value",
                    help="config overrides, e.g. model.width=0.25 train.log_every=5")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    cfg = load_config(REPO / args.config, args.overrides)
    if args.data:
        cfg = override(cfg, {"data.root": args.data})
    device = torch.device(args.device)
    info = DistInfo(device=device)
    cfg = resolve(cfg, info, require=(cfg.data.train_dir,))   # as train.py resolves it
    root = Path(cfg.data.root)
    run = build_run(cfg, info, RunLogger(REPO, is_main=False))
    for sig in (signal.SIGTERM, signal.SIGUSR1):   # a check has nothing to save: die at once
        signal.signal(sig, signal.SIG_DFL)
    loader = build_rotation_loader(cfg, str(root / cfg.data.train_dir), train=True, rank=0, world_size=1,
                                   local_rank=0, batch_size=cfg.optim.batch_size_per_gpu, device=device,
                                   seed=cfg.train.seed)
    found, epoch = check_syncs(run, loader, args.steps, args.warmup)
    how = "set_sync_debug_mode warn" if device.type == "cuda" else "calls that sync on CUDA, counted"
    print(f"sync check: {args.steps} steps of {cfg.model.arch} {cfg.data.crop_size} px "
          f"{cfg.train.precision}, {loader.backend} input, on {device.type} ({how}), "
          f"log_every {cfg.train.log_every}: "
          f"{sum(found.values())} host syncs outside the logging window"
          + "".join(f"\n  {n} x {what}" for what, n in found.most_common()), flush=True)
    flat = check_memory(run, loader, args, epoch) if args.epochs else True
    return 0 if not found and flat else 1


if __name__ == "__main__":
    sys.exit(main())
