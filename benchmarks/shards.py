"""Image folder vs tar shards (data.format): listing, opening and reading, and loader throughput.

    python benchmarks/shards.py --data ROOT/train [--shards runs/shards/NAME] [--limit N]
                                [--shard-size 1000] [--batch-size 64] [--steps 40] [--backends dali,torch]

Packs --data into --shards first (default runs/shards/<dataset>-<split>[-limitN], git-ignored;
resumable, so a second run reuses it). --limit N packs and reads a seeded random N images only
(through a file list, the same images in both formats, so the folder is listed from that list,
not walked): for smoke checks, not for figures.
Rows, each for the folder and for the shards:
  listing    what a loader does before its first batch: `list_images` (walk the class folders)
             vs `list_shards` (manifest + index files), timed as the FIRST call in a fresh Python
             process (median of --list-repeats processes). "Cold" means only that: without root the
             OS page and dentry caches cannot be dropped, and this script reads or writes every file
             just before, so the caches are warm. On Lustre/NFS the folder's cost is metadata
             round trips, which a warm local cache hides: the file counts say how many there are.
  opens      files opened per epoch and process: one per image vs one per shard.
  read       every image's bytes once in a seeded random order (no decode): open+read+close per
             file vs one pread from an open tar, images/s.
  dali/torch benchmarks/pipeline.py's loop (RRC + flip + 4 rotations, uint8 out), original img/s.
Results are added under this script's own heading in docs/benchmarks.md (--no-write: print only).
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.pipeline import bench_rotnet  # noqa: E402
from benchmarks.report import machine, publish  # noqa: E402
from pipelines.listing import list_images, list_shards, write_file_list  # noqa: E402
from pipelines.pack_shards import pack  # noqa: E402
from rotnet.checkpoint import git_commit  # noqa: E402

HEADING = "## Tar shards vs image folder (benchmarks/shards.py)"
INTRO = ("Each block: one run of `python benchmarks/shards.py` (see its docstring for what each row times). "
         "Listing = first call in a fresh process, with warm OS caches (no root to drop them).")


def first_call_s(fmt: str, path: str, file_list: str, repeats: int) -> float:
    """Median over `repeats` fresh processes of the seconds of the first listing call in each."""
    times = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--time-listing", fmt, path, file_list], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        times.append(float(out.split()[-1]))
    return statistics.median(times)


def time_listing(fmt: str, path: str, file_list: str) -> float:
    t0 = time.perf_counter()
    if fmt == "folder":
        list_images(path, file_list)
    else:
        list_shards(path)
    return time.perf_counter() - t0


def read_rate(fmt: str, path: str, file_list: str, seed: int = 0) -> float:
    """Images/s reading every image's bytes once, in a seeded random order, without decoding."""
    if fmt == "folder":
        paths = list_images(path, file_list)[0]

        def read(i):
            with open(paths[i], "rb") as f:
                return f.read()
    else:
        paths, _, _, store = list_shards(path)
        read = store.read
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    t0 = time.perf_counter()
    for i in order:
        read(i)
    return len(order) / (time.perf_counter() - t0)


def subset_list(args) -> str:
    """--limit: a file list of a seeded random `limit` images of --data (sorted), else ''."""
    if not args.limit:
        return ""
    paths, labels, _ = list_images(args.data)
    keep = sorted(random.Random(0).sample(range(len(paths)), min(args.limit, len(paths))))
    path = os.path.normpath(args.shards) + ".list.txt"    # beside the shard folder
    write_file_list(path, [os.path.relpath(paths[i], args.data) for i in keep], [labels[i] for i in keep])
    return os.path.abspath(path)


def run(args) -> dict:
    file_list = subset_list(args)
    t0 = time.perf_counter()
    manifest = pack(args.data, args.shards, shard_size=args.shard_size, workers=args.workers,
                    file_list=file_list)
    packed_s = time.perf_counter() - t0
    where = {"folder": args.data, "shards": args.shards}
    rows = {"listing, first call in a fresh process (ms)": {}, "files opened per epoch and process": {},
            "read all bytes once, no decode (img/s)": {}}
    for fmt, path in where.items():
        rows["listing, first call in a fresh process (ms)"][fmt] = 1000 * first_call_s(fmt, path, file_list,
                                                                                      args.list_repeats)
        rows["files opened per epoch and process"][fmt] = (manifest["count"] if fmt == "folder"
                                                           else len(manifest["shards"]))
        rows["read all bytes once, no decode (img/s)"][fmt] = read_rate(fmt, path, file_list)
    device = torch.device("cpu")
    for backend in args.backends.split(","):
        name = f"{backend} loader (original img/s)"
        rows[name] = {}
        for fmt, path in where.items():
            if fmt == "shards":
                over = ["data.format=shards"]
            else:
                over = [f"data.file_list={file_list}"] if file_list else []
            row_args = argparse.Namespace(**{**vars(args), "data": path, "overrides": over, "prepare": False})
            rows[name][fmt] = bench_rotnet(row_args, backend, device, lambda: None)
    return {"rows": rows, "count": manifest["count"], "shards": len(manifest["shards"]), "packed_s": packed_s,
            "file_list": file_list}


def report(args, res: dict) -> str:
    lines = [
        f"### {datetime.date.today().isoformat()}, commit {git_commit()}", "",
        f"- machine: {machine('cpu')}; load average before the run: {args.load:.1f}",
        f"- data: {args.data} ({res['count']} images"
        f"{', a seeded subset: --limit ' + str(args.limit) if args.limit else ''})"
        f" -> {res['shards']} shards of <= {args.shard_size} in {args.shards} (packing this run: "
        f"{res['packed_s']:.1f} s, {args.workers} workers, 0 when already packed)",
        f"- loaders: RRC {args.crop} + flip + 4 rotations, batch {args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup}, num_threads={args.threads}, "
        f"prefetch={args.prefetch}, uint8 out", "",
        "| | folder | shards | shards / folder |", "|---|---:|---:|---:|",
    ]
    for name, v in res["rows"].items():
        ratio = v["shards"] / v["folder"] if v["folder"] else float("nan")
        cells = [f"{x:,}" if isinstance(x, int) else f"{x:,.1f}" for x in (v["folder"], v["shards"])]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--time-listing"]:   # the fresh process of first_call_s
        print(time_listing(*sys.argv[2:5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("ROTNET_BENCH_DATA", ""), help="image folder ROOT/train")
    ap.add_argument("--shards", default="",
                    help="shard folder (default runs/shards/<dataset>-<split>[-limitN])")
    ap.add_argument("--limit", type=int, default=0, help="only a seeded random N images (smoke checks)")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="packer processes")
    ap.add_argument("--list-repeats", type=int, default=3, help="fresh processes per listing figure")
    ap.add_argument("--batch-size", type=int, default=64, help="original images per step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="loaders' num_threads")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--backends", default="dali,torch")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if not args.data or not os.path.isdir(args.data):
        print(f"skipped: data folder {args.data!r} not found (pass --data or set ROTNET_BENCH_DATA)")
        return 0
    args.data = os.path.abspath(args.data)
    if not args.shards:
        name = f"{os.path.basename(os.path.dirname(args.data))}-{os.path.basename(args.data)}"
        name += f"-limit{args.limit}" if args.limit else ""
        args.shards = os.path.join(REPO, "runs", "shards", name)
    args.load = os.getloadavg()[0]
    text = report(args, run(args))
    publish(text, args.out, HEADING, INTRO, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
