"""Input-pipeline throughput: original images/second with K=4 rotations emitted, ready for the model.

    python benchmarks/pipeline.py --data ROOT/train [--batch-size 64] [--steps 40] [--crop 224]
                                  [--device cpu|cuda] [--backends dali,torch,reference] [data.key=value ...]

--data may also come from $ROTNET_BENCH_DATA; without either (or if the folder is missing)
the benchmark prints why and exits 0 (skipped). Same data and recipe for all rows
(imagenet train: random-resized-crop + flip, then the 4 rotations):
  dali       pipelines.build_rotation_loader, loader.backend=dali
  torch      pipelines.build_rotation_loader, loader.backend=torch
  reference  what one would otherwise write: torchvision ImageFolder, RandomResizedCrop,
             RandomHorizontalFlip, ToTensor, Normalize, DataLoader(workers = cores), then
             torch.rot90 x4 on the batch.
On CPU the rotnet loaders emit uint8 (4N, H, W, C) and normalisation is the trainer's first
step (`prepare_batch`); --prepare includes that step in the timed loop. On cuda the DALI
graph decodes with device="mixed" and emits normalised float16.
Results are appended (never rewritten) to docs/benchmarks.md under a heading of this script's own.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.report import append_block, machine  # noqa: E402
from pipelines import build_rotation_loader, prepare_batch  # noqa: E402
from rotnet.checkpoint import git_commit  # noqa: E402
from rotnet.config import ConfigError, load_config  # noqa: E402


def time_loop(batches, steps: int, warmup: int, n: int, sync, step_fn=None) -> float:
    """Original images/second over `steps` batches after `warmup` (n originals per batch)."""
    it = iter(batches)
    for _ in range(warmup):
        step_fn(next(it)) if step_fn else next(it)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = next(it)
        if step_fn:
            step_fn(out)
    sync()
    return steps * n / (time.perf_counter() - t0)


def bench_rotnet(args, backend: str, device: torch.device, sync) -> float:
    cfg = load_config(None, [f"loader.backend={backend}", "data.recipe=imagenet",
                             f"data.crop_size={args.crop}", f"loader.num_threads={args.threads}",
                             f"loader.prefetch={args.prefetch}", *args.overrides])
    loader = build_rotation_loader(cfg, args.data, batch_size=args.batch_size, rank=0, world_size=1,
                                   local_rank=0, device=device, train=True, seed=0)
    need = args.steps + args.warmup
    if len(loader) < need:
        raise SystemExit(f"{args.data}: {len(loader)} batches per epoch < {need} steps needed")
    step_fn = (lambda b: prepare_batch(b[0], cfg.data, channels_last=True)) if args.prepare else None
    return time_loop(loader, args.steps, args.warmup, args.batch_size, sync, step_fn)


def bench_reference(args, device: torch.device, sync) -> float:
    import torchvision.datasets as datasets
    import torchvision.transforms as T

    tf = T.Compose([T.RandomResizedCrop(args.crop), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = datasets.ImageFolder(args.data, transform=tf)
    workers = os.cpu_count() or 1
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                     drop_last=True, pin_memory=device.type == "cuda",
                                     persistent_workers=True)

    def batches():
        while True:
            for x, _ in dl:
                x = x.to(device, non_blocking=True)
                rot = torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(4)], dim=1)
                yield rot.flatten(0, 1), torch.arange(4, device=device).repeat(x.shape[0])

    return time_loop(batches(), args.steps, args.warmup, args.batch_size, sync)


def append_results(path: str, args, device, results: dict) -> None:
    """Append one self-contained block (heading + table); never edits what is there."""
    lines = [
        "", f"## Input pipeline (benchmarks/pipeline.py), {datetime.date.today().isoformat()}", "",
        f"- machine: {machine(device)}; device: {device.type}; commit: {git_commit()}; "
        f"load average before the run: {args.load:.1f} "
        "(other jobs share the cores: compare rows of one block)",
        f"- data: {args.data} ({args.num_files} images); recipe: imagenet train RRC {args.crop} + flip, "
        f"4 rotations; batch {args.batch_size} originals; {args.steps} timed steps after {args.warmup}; "
        f"rotnet loaders num_threads={args.threads}, prefetch={args.prefetch}"
        + ("; prepare_batch timed" if args.prepare else "; uint8 out on CPU, prepare_batch not timed"),
        "", "| pipeline | original img/s | x reference |", "|---|---:|---:|",
    ]
    ref = results.get("reference")
    for name, v in results.items():
        rel = f"{v / ref:.1f}x" if ref else "-"
        lines.append(f"| {name} | {v:,.0f} | {rel} |")
    append_block(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("ROTNET_BENCH_DATA", ""),
                    help="split folder ROOT/train (or $ROTNET_BENCH_DATA)")
    ap.add_argument("--batch-size", type=int, default=64, help="original images per step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="rotnet loaders' num_threads")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--backends", default="dali,torch,reference")
    ap.add_argument("--prepare", action="store_true", help="time prepare_batch (normalise) too")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value",
                    help="config settings for the rotnet rows, e.g. loader.hw_decoder_load=0.9 or "
                         "loader.normalize=graph; they apply after the flags above")
    args = ap.parse_args(argv)
    if not args.data or not os.path.isdir(args.data):
        print(f"skipped: data folder {args.data!r} not found (pass --data or set ROTNET_BENCH_DATA)")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda but no CUDA device")
        return 0
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    args.num_files = sum(len(fs) for _, _, fs in os.walk(args.data))
    args.load = os.getloadavg()[0]
    try:   # bad overrides: one line, before any work
        load_config(None, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    results = {}
    for name in args.backends.split(","):
        t0 = time.perf_counter()
        if name == "reference":
            results[name] = bench_reference(args, device, sync)
        else:
            results[name] = bench_rotnet(args, name, device, sync)
        print(f"{name:10s} {results[name]:9,.0f} original img/s  "
              f"({time.perf_counter() - t0:.0f} s incl. start)", flush=True)
    if not args.no_write:
        append_results(args.out, args, device, results)
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
