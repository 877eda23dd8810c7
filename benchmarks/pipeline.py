"""Input-pipeline throughput: original images/second, every row ending at the same model input.

    python benchmarks/pipeline.py --data ROOT/train [--batch-size 64] [--steps 40] [--crop 224]
                                  [--threads N] [--device cpu|cuda]
                                  [--backends dali,torch,reference,ffcv,ffcv-rot] [data.key=value ...]

--data may also come from $ROTNET_BENCH_DATA; without either (or if the folder is missing)
the benchmark prints why and exits 0 (skipped). Same images, recipe (random-resized-crop + flip)
and cores (--threads workers or threads per row) for all rows, and equal work: each row ends at
float32 (4N, 3, S, S), channels-last, normalised by ImageNet's mean/std, the 4 rotations
sample-major (row 4i + r is original i turned r x 90 degrees), i.e. what the model takes:
  dali       pipelines.build_rotation_loader, loader.backend=dali, then prepare_batch (timed)
  torch      pipelines.build_rotation_loader, loader.backend=torch, then prepare_batch (timed)
  reference  what one would otherwise write: torchvision ImageFolder, RandomResizedCrop,
             RandomHorizontalFlip, ToTensor, Normalize, DataLoader(workers = --threads), then
             the 4 rotations of the batch (`rotate4`).
  ffcv       FFCV 1.0.2 on a .beton of the same images (benchmarks/ffcv_rows.py): its own one
             view, (N, 3, S, S); shown for scale, not equal work.
  ffcv-rot   the same, then `rotate4`: equal work; the "x FFCV+rot" column divides by this row.
The FFCV rows need FFCV (benchmarks/requirements-ffcv.txt; docs/pipelines.md, Throughput); without it
they are skipped with a line saying so. The first warm-up batch of each row is checked and its
output spec (dtype, shape, layout, normalised, rotations) printed and written beside the row;
rows that should be equal but are not end the run before anything is written.
Results are appended (never rewritten) to docs/benchmarks.md under a heading of this script's own.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.image_set import stats  # noqa: E402
from benchmarks.report import append_block, machine  # noqa: E402
from pipelines import build_rotation_loader, prepare_batch  # noqa: E402
from rotnet.checkpoint import git_commit  # noqa: E402
from rotnet.config import ConfigError, DataConfig, load_config  # noqa: E402
from rotnet.distributed import DistInfo  # noqa: E402

# every row normalises by the recipe's mean/std (rotnet.config: ImageNet's)
IMAGENET_MEAN, IMAGENET_STD = tuple(DataConfig().mean), tuple(DataConfig().std)
ROWS = ("dali", "torch", "reference", "ffcv", "ffcv-rot")
ONE_VIEW = ("ffcv",)      # rows that emit N images on purpose: not held to the equal-work spec
FFCV_ROW = "ffcv-rot"     # the equal-work FFCV row, denominator of the "x FFCV+rot" column


def rotate4(x: torch.Tensor) -> torch.Tensor:
    """float (N, C, S, S), any memory format -> (4N, C, S, S) channels-last, sample-major: row 4i + r is
    x[i] turned r x 90 degrees counter-clockwise (pipelines/recipe.py's convention). One copy."""
    hwc = x.permute(0, 2, 3, 1)                                               # (N, S, S, C) view
    out = torch.stack([torch.rot90(hwc, k, dims=(1, 2)) for k in range(4)], dim=1)  # (N, 4, S, S, C)
    return out.flatten(0, 1).permute(0, 3, 1, 2)                             # (4N, C, S, S) view


def _layout(x: torch.Tensor) -> tuple[str, tuple[int, int]]:
    """('channels-last' | 'NCHW' | 'NHWC' | 'strided', the (H, W) dims)."""
    if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return ("NHWC" if x.is_contiguous() else "strided"), (1, 2)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return "channels-last", (2, 3)
    return ("NCHW" if x.is_contiguous() else "strided"), (2, 3)


def is_normalised(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, tol: float = 1e-2) -> bool:
    """float (B, C, H, W) whose every channel lies in [(0 - mean)/std, (1 - mean)/std] and that goes
    below 0 somewhere: pixels/255 normalised by mean/std (raw 0-255 or 0-1 values fail). `tol` covers
    a GPU graph's float16 rounding."""
    if not x.is_floating_point() or x.dim() != 4 or x.shape[1] != len(mean):
        return False
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    x = x.detach().float().cpu()
    inside = bool(((x >= -m / s - tol) & (x <= (1 - m) / s + tol)).all())
    return inside and bool((x < 0).any())


def is_rotated4(x: torch.Tensor, dims: tuple[int, int], originals: int = 2) -> bool:
    """True when rows 4i + r are rows 4i turned r x 90 degrees (checked on the first `originals`)."""
    if x.shape[0] % 4 or x.shape[dims[0]] != x.shape[dims[1]]:
        return False
    d = (dims[0] - 1, dims[1] - 1)     # dims of one image
    return all(torch.equal(x[4 * i + r], torch.rot90(x[4 * i], r, dims=d))
               for i in range(min(originals, x.shape[0] // 4)) for r in range(1, 4))


def output_spec(x: torch.Tensor) -> str:
    """'float32 (256, 3, 224, 224) channels-last, ImageNet-normalised, 4 rotations': what a batch is."""
    layout, dims = _layout(x)
    norm = "ImageNet-normalised" if is_normalised(x) else "not normalised"
    rots = "4 rotations" if is_rotated4(x, dims) else "one view"
    return f"{str(x.dtype).removeprefix('torch.')} {tuple(x.shape)} {layout}, {norm}, {rots}"


def unequal_rows(specs: dict[str, str]) -> list[str]:
    """Rows (ONE_VIEW rows aside) whose spec differs from the first such row's: they did other work."""
    held = [name for name in specs if name not in ONE_VIEW]
    return [name for name in held if specs[name] != specs[held[0]]]


def time_loop(batches, steps: int, warmup: int, n: int, sync) -> tuple[float, str]:
    """(original images/second over `steps` batches after `warmup`, n originals per batch; the first
    warm-up batch's output_spec). A batch is (images, labels); `warmup` >= 1."""
    it = iter(batches)
    spec = output_spec(next(it)[0])
    for _ in range(warmup - 1):
        next(it)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    sync()
    return steps * n / (time.perf_counter() - t0), spec


def rotnet_batches(args, backend: str, device: torch.device):
    """pipelines' rotation loader, one epoch; with args.prepare each batch goes through prepare_batch
    (the trainer's first step: uint8 (4N, S, S, C) -> normalised float32, channels-last)."""
    cfg = load_config(None, [f"loader.backend={backend}", "data.recipe=imagenet",
                             f"data.crop_size={args.crop}", f"loader.num_threads={args.threads}",
                             f"loader.prefetch={args.prefetch}", *args.overrides])
    loader = build_rotation_loader(cfg, args.data, batch_size=args.batch_size, info=DistInfo(device=device),
                                   train=True, seed=0)
    need = args.steps + args.warmup
    if len(loader) < need:
        raise SystemExit(f"{args.data}: {len(loader)} batches per epoch < {need} steps needed")
    for images, labels in loader:
        yield (prepare_batch(images, cfg.data, channels_last=True) if args.prepare else images), labels


def bench_rotnet(args, backend: str, device: torch.device, sync) -> float:
    """Original images/second of a rotnet loader (benchmarks/shards.py times its loaders with this)."""
    return time_loop(rotnet_batches(args, backend, device), args.steps, args.warmup, args.batch_size, sync)[0]


def reference_batches(args, device: torch.device):
    """What one would otherwise write, endlessly: torchvision's transforms in DataLoader workers."""
    import torchvision.datasets as datasets
    import torchvision.transforms as T

    tf = T.Compose([T.RandomResizedCrop(args.crop), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(args.data, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.threads,
                                     drop_last=True, pin_memory=device.type == "cuda",
                                     persistent_workers=True)
    labels = torch.arange(4, device=device).repeat(args.batch_size)
    while True:
        for x, _ in dl:
            yield rotate4(x.to(device, non_blocking=True)), labels


def row_batches(name: str, args, device: torch.device):
    if name == "reference":
        return reference_batches(args, device)
    if name in ("ffcv", FFCV_ROW):
        from benchmarks.ffcv_rows import ffcv_batches

        return ffcv_batches(args, rotate4 if name == FFCV_ROW else None)
    return rotnet_batches(args, name, device)


def ffcv_missing(device: torch.device) -> str:
    """'' when the FFCV rows can run here, else why not (one line)."""
    if device.type != "cpu":
        return "the FFCV rows run on the CPU only (--device cpu)"
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        return f"ffcv does not import ({e}); install: benchmarks/requirements-ffcv.txt, docs/pipelines.md"
    return ""


def run_rows(names: list[str], args, device: torch.device, sync) -> tuple[dict, dict]:
    """({row: original img/s}, {row: output spec}), one row after the other, torch on --threads threads."""
    results, specs, threads = {}, {}, torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for name in names:
            t0 = time.perf_counter()
            batches = row_batches(name, args, device)
            results[name], specs[name] = time_loop(batches, args.steps, args.warmup, args.batch_size, sync)
            batches.close()     # its workers and threads end before the next row is timed
            print(f"{name:10s} {results[name]:9,.0f} original img/s  ({time.perf_counter() - t0:.0f} s incl. "
                  f"start)  out: {specs[name]}", flush=True)
    finally:
        torch.set_num_threads(threads)     # main() also runs inside tests: leave the process as it was
    return results, specs


def table(results: dict[str, float], specs: dict[str, str]) -> list[str]:
    """Markdown rows: pipeline, original img/s, x reference, x FFCV+rot (the ffcv-rot row), output spec."""
    ref, ffcv = results.get("reference"), results.get(FFCV_ROW)
    lines = ["| pipeline | original img/s | x reference | x FFCV+rot | output |", "|---|---:|---:|---:|---|"]
    for name, v in results.items():
        lines.append(f"| {name} | {v:,.0f} | {f'{v / ref:.2f}x' if ref else '-'} | "
                     f"{f'{v / ffcv:.2f}x' if ffcv else '-'} | {specs[name]} |")
    return lines


def append_results(path: str, args, device, results: dict, specs: dict) -> None:
    """Append one self-contained block (heading + table); never edits what is there."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "", f"## Input pipeline, equal work (benchmarks/pipeline.py), {now}", "",
        f"- commit {git_commit()}; machine: {machine(device)}; device: {device.type}; "
        f"load average before the run: {args.load:.1f}",
        f"- command: `{args.command}`",
        f"- data: {args.data} ({args.images}); recipe: RRC {args.crop} + flip; batch "
        f"{args.batch_size} originals; {args.steps} timed steps after {args.warmup}; {args.threads} "
        f"workers/threads per row (torch.set_num_threads too); rotnet loaders prefetch={args.prefetch}",
        "- every row ends at the model's input (output column), timed: rotnet rows include prepare_batch; "
        f"ffcv is FFCV's one view (not equal work); x FFCV+rot divides by the {FFCV_ROW} row",
    ]
    lines += [f"- {note}" for note in args.notes]
    append_block(path, "\n".join(lines + ["", *table(results, specs)]) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("ROTNET_BENCH_DATA", ""),
                    help="split folder ROOT/train, class folders (or $ROTNET_BENCH_DATA)")
    ap.add_argument("--batch-size", type=int, default=64, help="original images per step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed batches first (>= 1: the first is checked)")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="every row's workers/threads, and torch's intra-op threads")
    ap.add_argument("--prefetch", type=int, default=2, help="rotnet loaders' prefetch")
    ap.add_argument("--backends", default=",".join(ROWS), help=f"rows, any of {','.join(ROWS)}")
    ap.add_argument("--ffcv-quality", type=int, default=0,
                    help="JPEG quality of FFCV's writer (.beton); 0 (default): the source JPEGs' own")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value",
                    help="config settings for the rotnet rows, e.g. loader.hw_decoder_load=0.9 or "
                         "loader.normalize=graph; they apply after the flags above")
    args = ap.parse_args(argv)
    names = args.backends.split(",")
    if bad := [n for n in names if n not in ROWS]:
        ap.error(f"--backends: {bad} not in {ROWS}")
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first warm-up batch is checked)")
    if not args.data or not os.path.isdir(args.data):
        print(f"skipped: data folder {args.data!r} not found (pass --data or set ROTNET_BENCH_DATA)")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda but no CUDA device")
        return 0
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    args.command = shlex.join(["python", "benchmarks/pipeline.py",
                               *(sys.argv[1:] if argv is None else argv)])
    args.load = os.getloadavg()[0]
    st = stats(Path(args.data))     # decode cost grows with pixels and bytes: say what was read
    args.images = (f"{st['count']} images, mean {st['mean_w']:.0f}x{st['mean_h']:.0f} px, "
                   f"{st['mean_kb']:.1f} KB")
    args.prepare = True      # equal work: the rotnet rows end at the model's input too
    args.notes = []
    try:   # bad overrides: one line, before any work
        load_config(None, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if any(n in ("ffcv", FFCV_ROW) for n in names) and (why := ffcv_missing(device)):
        print(f"ffcv rows skipped: {why}")
        args.notes.append(f"FFCV rows skipped: {why}")
        names = [n for n in names if n not in ("ffcv", FFCV_ROW)]
    results, specs = run_rows(names, args, device, sync)
    if bad := unequal_rows(specs):
        raise SystemExit(f"error: rows {bad} emit other than the rows before them (outputs above): "
                         "not equal work; nothing written")
    if not args.no_write:
        append_results(args.out, args, device, results, specs)
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
