"""Correctness of train.py's step on a device: no host sync outside the logging window, flat memory.

    python benchmarks/step_check.py --device cuda --data DIR --config configs/imagenette_alexnet.yaml
    python benchmarks/step_check.py                      # CPU, built-in sample data, toy sizes below

1. Host syncs: --steps steps of `train.train_one_epoch` (after --warmup unchecked steps: cuDNN's
   autotuning and the first allocations happen once) must not make the host wait for the device
   outside the logging window (rotnet.epoch_log's close_window and epoch_stats, the stop check).
   CUDA: torch.cuda.set_sync_debug_mode("warn") outside the window, 0 inside; each warning is
   counted with the line that caused it. CPU (nothing syncs there): the calls that would sync on
   CUDA are counted instead, outside the window and outside the loader, by the ops behind them
   (a TorchDispatchMode: `SyncOps`): _local_scalar_dense (.item(), float(), int(), bool(), an
   `if` on a tensor), nonzero, masked_select, boolean-mask indexing, torch.equal, copies from a
   device to the CPU. A move to the CPU of a CPU tensor dispatches nothing, so .to("cpu"),
   .cpu(), .numpy() and .tolist() are counted by name, on every tensor in the step but the
   loader's own outputs (which stand for host tensors; the rest stand for device tensors; the
   stand-in device being the CPU, a .to(the run's device) of a device tensor counts too). And,
   the loader included, tensors built from Python values straight onto a device (torch.tensor /
   torch.as_tensor with device=).
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
import weakref
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402  (train.py: the step being checked)
from pipelines import rotation_loaders  # noqa: E402
from rotnet.config import load_config, override  # noqa: E402
from rotnet.distributed import DistInfo  # noqa: E402
from rotnet.epoch_log import EpochLog  # noqa: E402
from rotnet.preemption import StopFlag  # noqa: E402
from rotnet.progress import RunLogger  # noqa: E402
from train import Run, build_run, resolve  # noqa: E402

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default: "_local_scalar_dense (.item/float/int/bool)",
            aten.nonzero.default: "nonzero", aten.masked_select.default: "masked_select",
            aten.equal.default: "torch.equal"}
MASK_OPS = (aten.index.Tensor, aten.index_put_.default, aten.index_put.default)   # a nonzero inside
NOT_THE_CALLER = (str(Path(torch.__file__).parent), __file__)   # frames skipped to find the step's line


def sync_op(func, args: tuple, kwargs: dict) -> str | None:
    """What makes this aten call wait for the device (on a GPU), or None."""
    if func in SYNC_OPS:
        return SYNC_OPS[func]
    if func in MASK_OPS and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                for i in args[1]):
        return "boolean-mask indexing (nonzero)"
    if func is aten._to_copy.default:
        src, dst = args[0].device.type, torch.device(kwargs.get("device") or args[0].device).type
    elif func is aten.copy_.default:
        src, dst = args[1].device.type, args[0].device.type
    else:
        return None
    return "copy to the CPU" if dst == "cpu" and src != "cpu" else None


class SyncOps(TorchDispatchMode):
    """Every aten call `sync_op` names, reported to `watch` (which counts it in the step only)."""

    def __init__(self, watch: "SyncWatch"):
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = sync_op(func, args, kwargs)
        if what and self.watch.where == "step":
            self.watch.hit(what)
        return func(*args, **kwargs)


class SyncWatch:
    """Where the step is: "window" (the logging window: syncs allowed), "loader", or "step".
    `found` counts what would sync outside the window: 'what at file:line' -> calls. `host`: the
    current batch's tensors as the loader gave them (id -> weak reference), the only tensors in
    the step that stand for host tensors on the CPU path."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.where = "step"
        self.found: collections.Counter = collections.Counter()
        self.host: dict[int, weakref.ref] = {}

    def hit(self, what: str) -> None:
        """Count `what` at the first line up the stack outside torch and this file."""
        frame = sys._getframe(1)
        while frame.f_back and frame.f_code.co_filename.startswith(NOT_THE_CALLER):
            frame = frame.f_back
        self.found[f"{what} at {frame.f_code.co_filename}:{frame.f_lineno}"] += 1

    def stands_for_device(self, t: torch.Tensor) -> bool:
        ref = self.host.get(id(t))
        return ref is None or ref() is not t

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
        """`fn`, counted where it would sync on CUDA: in the step, on a CPU tensor that stands for
        a device tensor (a real device tensor's copy is dispatched: SyncOps counts it); with
        onto_device (a tensor built from Python values) in the loader too, when given a device."""
        def wrapped(*args, **kwargs):
            if onto_device:   # torch.tensor(data, *, device=), torch.as_tensor(data, dtype, device)
                device = kwargs.get("device", args[2] if len(args) > 2 else None)
                hit = self.where != "window" and device is not None
            else:
                t = args[0]
                hit = self.where == "step" and t.device.type == "cpu" and self.stands_for_device(t)
                if what == '.to("cpu")':   # only a move to the CPU: .to(torch.float16) is not one
                    hit = hit and to_device(args[1:], kwargs) == "cpu"
            if hit:
                self.hit(what)
            return fn(*args, **kwargs)
        return wrapped

    def batches(self, loader):
        """`loader` as train_one_epoch sees it, each batch fetched inside "loader"."""
        watch = self

        class Marked:
            def set_epoch(self, epoch):   # loader work (DALI runs the rest of a cut epoch)
                with watch.inside("loader"):
                    loader.set_epoch(epoch)

            def __len__(self):
                return len(loader)

            def __iter__(self):
                it = iter(loader)
                while True:
                    with watch.inside("loader"):
                        batch = next(it, None)
                    if batch is None:
                        return
                    watch.host = {id(t): weakref.ref(t) for t in batch if isinstance(t, torch.Tensor)}
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
                stack.enter_context(SyncOps(self))
                for name in ("tolist", "cpu", "numpy", "to"):
                    what = '.to("cpu")' if name == "to" else f".{name}()"
                    method = self.counted(what, getattr(torch.Tensor, name))
                    stack.enter_context(mock.patch.object(torch.Tensor, name, method))
                for name in ("tensor", "as_tensor"):
                    build = self.counted(f"torch.{name}(..., device=)", getattr(torch, name), True)
                    stack.enter_context(mock.patch.object(torch, name, build))
            yield

    def _count_warnings(self, caught) -> None:
        for w in caught:
            if "synchroniz" in str(w.message):
                self.found[f"sync at {w.filename}:{w.lineno}"] += 1


def to_device(args: tuple, kwargs: dict) -> str | None:
    """The device type a Tensor.to(...) call moves to, or None: .to("cpu"), .to(device=...),
    .to(other_tensor), .to(torch.device("cpu"), torch.float16); not .to(torch.float16)."""
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, torch.Tensor):
        return target.device.type
    if isinstance(target, (str, torch.device, int)):
        return torch.device(target).type
    return None


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
    cfg = resolve(cfg, info, splits=(cfg.data.train_dir,))   # as train.py resolves it
    run = build_run(cfg, info, RunLogger(REPO, is_main=False), loaders=False)
    for sig in (signal.SIGTERM, signal.SIGUSR1):   # a check has nothing to save: die at once
        signal.signal(sig, signal.SIG_DFL)
    loader, _ = rotation_loaders(cfg, info, val=False)   # the run's train loader, as build_run makes it
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
