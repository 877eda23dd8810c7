"""Cluster storage: rotnet's loaders and their peers on the local disk and through a mount that adds
a set latency to every round trip (benchmarks/latency_fs.py), on the same images and cores.

    bash benchmarks/setup_storage.sh                     # once: fuse3, the mount's server, webdataset
    .venv-storage/bin/python benchmarks/storage.py --pool DIR [--images 3000] [--latencies 0,0.5,1,2,5]
                                [--seconds 8] [--threads 2] [--quick] [--no-write]

Data: a seeded subset of --images JPEGs of --pool (Imagenette's train split) re-encoded at ImageNet's
most common size, 500x375, quality 90 (benchmarks/image_set.py), in class folders and packed into tar
shards of --shard-size (pipelines.pack_shards), kept under --work for the next run.
Conditions: the local disk (every file read once before: the page cache), then the folder mounted
with +L ms per open, read, getattr and readdir for each L of --latencies (a fresh mount per L).
Rows, reader-only (encoded samples, nothing decoded: samples/s) and full pipeline (decode, random-
resized crop --crop, flip, the 4 rotations, uint8 out: original images/s):
  rotnet folder / shards    pipelines.build_rotation_loader (DALI on the CPU, --threads threads);
                            reader-only is the loader's `read_only_batches(epochs)`
  DALI readers.file         DALI's folder reader, random_shuffle, then rotnet's CPU recipe: only the
                            reader differs
  DALI readers.webdataset   DALI's tar reader on rotnet's shards and their wds2idx indexes (both with
                            dont_use_mmap, as DALI advises for network storage: a mapped file is read
                            from memory after its first pass, which would measure memory, not the mount)
  webdataset + DataLoader   the webdataset package streaming the shards, a 1,000-sample shuffle buffer
                            per worker, PIL decode + torchvision RRC + flip + rot90, --workers workers
Reads in flight per row: rotnet's `reads_in_flight`; a DALI reader 1 (one reader thread); webdataset
one stream per worker. Each figure: --warmup steps, then steps for --seconds (batches a loader has
queued by then count too, so keep --seconds long). The mount's own cost: small files (open + read +
close) per second, from one and from --cost-threads threads, on the local disk and at +0 ms.
Output: a markdown block under this script's heading in docs/benchmarks.md (--no-write: print only).
Figures need quiet cores; --quick is a smoke run (a few hundred images, two latencies, short figures).
"""
from __future__ import annotations

import datetime
import functools
import itertools
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import image_set, latency_fs  # noqa: E402
from benchmarks.report import machine, publish  # noqa: E402
from benchmarks.storage_readers import (  # noqa: E402
    dali_file_reader,
    dali_steps,
    dali_wds_reader,
    rotnet_steps,
    wds_steps,
)
from pipelines.dali_loader import read_file  # noqa: E402
from pipelines.listing import list_images  # noqa: E402
from pipelines.sample_data import cache_root  # noqa: E402
from rotnet.checkpoint import git_commit  # noqa: E402
from rotnet.cli import ArgumentParser, InputError, fail  # noqa: E402
from rotnet.config import LoaderConfig  # noqa: E402

HEADING = "## Cluster storage (benchmarks/storage.py)"
INTRO = ("Each block: one run of `python benchmarks/storage.py`: rotnet's loaders and their peers on "
         "the local disk and through benchmarks/latency_fs.py, a FUSE mount adding a set latency to every "
         "open, read, getattr and readdir (page cache off). Percentages: of the same row at +0 ms.")
READERS = ("rotnet folder", "rotnet shards", "DALI readers.file", "DALI readers.webdataset",
           "webdataset + DataLoader")
MODES = {"reader": "reader-only, samples/s", "full": "full pipeline, original img/s"}
SERVER = "server "   # a row's key prefix: the mount server's cores busy in that column
QUICK = {"images": 256, "shard_size": 64, "batch": 16, "seconds": 0.5, "warmup": 1, "latencies": "0,2",
         "cost_files": 64}


class StorageError(InputError):
    """A setting or the data folder does not fit; the message names it."""


def parse_latencies(text: str) -> list[float]:
    """'0,0.5,2' -> [0.0, 0.5, 2.0]: added milliseconds, each >= 0, in the given order."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StorageError(f"--latencies {text!r}: expected milliseconds separated by commas, "
                           "e.g. 0,2") from None
    if not values or any(v < 0 for v in values):
        raise StorageError(f"--latencies {text!r}: give at least one value, none negative")
    return values


def conditions(latencies: list[float]) -> list[tuple[str, float | None]]:
    """[(column name, added ms or None for the local disk)]: the local disk first."""
    return [("local disk", None)] + [(f"+{ms:g} ms", ms) for ms in latencies]


# ------------------------------------------------------------------ data
def data_dirs(args, base: str) -> tuple[str, str]:
    """(image folder, shard folder) under `base`: args.work, or a mount of it."""
    return os.path.join(base, "train"), os.path.join(base, f"shards-{args.shard_size}")


def prepare(args) -> tuple[str, str]:
    """(image folder, shard folder) under args.work, made on the first run and reused after."""
    from pipelines.pack_shards import pack

    folder, shards = data_dirs(args, args.work)
    if not os.path.isdir(folder):
        paths, _, _ = list_images(args.pool)
        if len(paths) < args.images:
            raise StorageError(f"--pool {args.pool!r} holds {len(paths)} images; --images {args.images} "
                               "needs more")
        os.makedirs(args.work, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            # the subset as links in class folders, so that image_set re-encodes exactly these
            for p in random.Random(0).sample(paths, args.images):
                link = os.path.join(tmp, "subset", os.path.relpath(p, args.pool))
                os.makedirs(os.path.dirname(link), exist_ok=True)
                os.symlink(p, link)
            image_set.upscale(Path(tmp, "subset"), Path(tmp, "train"), (500, 375), 90, args.workers)
            os.rename(os.path.join(tmp, "train"), folder)   # whole or not at all
    pack(folder, shards, shard_size=args.shard_size, workers=args.workers)   # resumable: skips done shards
    return folder, shards


# ------------------------------------------------------------------ rows
def row_steps(args, reader: str, mode: str, base: str, info: dict):
    """The step generator of one row, reading under `base` (the local folder or the mount)."""
    folder, shards = data_dirs(args, base)
    if reader == "rotnet folder":
        return rotnet_steps(args, folder, "folder", mode, info)
    if reader == "rotnet shards":
        return rotnet_steps(args, shards, "shards", mode, info)
    if reader == "DALI readers.file":
        return dali_steps(args, functools.partial(dali_file_reader, folder), mode, info)
    if reader == "DALI readers.webdataset":
        return dali_steps(args, functools.partial(dali_wds_reader, shards), mode, info)
    return wds_steps(args, shards, mode, info)


def measure(steps, args) -> float | None:
    """Samples/s over the steps after `args.warmup` (at least one), for `args.seconds` (at least one
    step); None when `steps` yields nothing (the reader has no such mode). The readers run forever:
    one that stops after a step would turn samples read ahead into a rate, so that is an error."""
    it = iter(steps)

    def step() -> int:
        got = next(it, None)
        if got is None:
            raise RuntimeError("the reader stopped: each row's steps must go on epoch after epoch")
        return got

    try:
        if next(it, None) is None:
            return None
        for _ in range(args.warmup - 1):
            step()
        t0, n = time.perf_counter(), step()
        while time.perf_counter() - t0 < args.seconds:
            n += step()
        return n / (time.perf_counter() - t0)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()   # stops the pipeline or the DataLoader's workers now, not at the next collection


# ------------------------------------------------------------------ the mount's own cost
def mount_cost(args, base: str) -> dict[str, float]:
    """Small files/s under `base` (latency_fs.small_file_rate), read as the rotnet folder row reads
    them (`read_file`): one at a time and from many threads."""
    names = [os.path.relpath(p, args.work) for p in list_images(data_dirs(args, args.work)[0])[0]]
    paths = [os.path.join(base, n) for n in random.Random(1).sample(names, min(args.cost_files, len(names)))]
    return {"one at a time": latency_fs.small_file_rate(paths, 1, read_file),
            f"{args.cost_threads} threads": latency_fs.small_file_rate(paths, args.cost_threads, read_file)}


# ------------------------------------------------------------------ the run
def run_condition(args, base: str, results: dict, column: str, server: int = 0) -> None:
    """One figure of every row under `base`, added to the row's list for `column`; through a mount
    (`server`: its process id) also the cores its server kept busy meanwhile (warm-up included): the
    model's own CPU, taken from the loaders' cores."""
    for reader, mode in itertools.product(args.readers, MODES):
        info = {}
        cpu0, t0 = latency_fs.cpu_seconds(server) if server else 0.0, time.perf_counter()
        try:
            value = measure(row_steps(args, reader, mode, base, info), args)
        except Exception:   # one failed row must not cost the others: its traceback goes to the log
            traceback.print_exc()
            value = "failed"
        row = results.setdefault((reader, mode), {"in_flight": info.get("in_flight", "?")})
        row.setdefault(column, []).append(value)
        busy = ""
        if server:
            cores = (latency_fs.cpu_seconds(server) - cpu0) / (time.perf_counter() - t0)
            row.setdefault(SERVER + column, []).append(cores)
            busy = f" | mount server {cores:.2f} cores"
        print(f"{column:>10} | {reader:24} | {mode:6} | {cell(value, None)}{busy}", flush=True)


def warm_page_cache(args) -> None:
    """Read every image and shard once, so that every local-disk row reads from the page cache, as the
    mount's server does (not only the rows after the first, which would read from the disk)."""
    for folder in data_dirs(args, args.work):
        for d, _, names in os.walk(folder):
            for name in names:
                read_file(os.path.join(d, name))


def median_cell(values: list):
    """A cell's figures over the rounds -> their median; 'failed' if one failed, None if n/a."""
    if any(isinstance(v, str) for v in values):
        return "failed"
    numbers = [v for v in values if v is not None]
    return statistics.median(numbers) if numbers else None


def run(args) -> dict:
    """Every condition mounted at once (a server of its own each), then `args.rounds` rounds over
    them in turn: a slow drift of the machine spreads over every column instead of landing on one.
    Each cell is the median of its rounds."""
    results, cost = {}, {}
    with ExitStack() as stack:
        bases = {}   # column -> (folder to read, mount server's process id or 0)
        for column, ms in conditions(args.latencies):
            if ms is None:
                bases[column] = (args.work, 0)
                continue
            mount = tempfile.mkdtemp(prefix="rotnet-storage-mnt-")
            stack.callback(os.rmdir, mount)   # after the unmount: the stack unwinds in reverse
            link = latency_fs.LinkSettings(latency_ms=ms, bandwidth_mbps=args.bandwidth_mbps,
                                           threads=args.mount_threads)
            bases[column] = (mount, stack.enter_context(latency_fs.mounted(args.work, mount, link)))
        warm_page_cache(args)
        for r in range(args.rounds):
            if args.rounds > 1:
                print(f"round {r + 1} of {args.rounds}", flush=True)
            for column, (base, server) in bases.items():
                run_condition(args, base, results, column, server)
        cost["local disk"] = mount_cost(args, args.work)
        if "+0 ms" in bases:
            cost["mount +0 ms"] = mount_cost(args, bases["+0 ms"][0])
    for row in results.values():
        for key, values in row.items():
            if isinstance(values, list):
                row[key] = median_cell(values)
    return {"rows": results, "cost": cost}


def cell(value, base) -> str:
    """'1,234' or '1,234 (93%)' (of `base`, the same row at +0 ms), 'n/a' or the failure."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    text = f"{value:,.0f}"
    return text + f" ({100 * value / base:.0f}%)" if isinstance(base, float) and base > 0 else text


def table(rows: dict, columns: list[str]) -> str:
    """One line per (reader, mode): reads in flight, then a cell per condition column."""
    lines = ["| reader | mode | reads in flight | " + " | ".join(columns) + " |",
             "|---|---|---:|" + "---:|" * len(columns)]
    for (reader, mode), row in rows.items():
        zero = row.get("+0 ms")
        cells = [cell(row.get(c), zero if c not in ("local disk", "+0 ms") else None) for c in columns]
        lines.append(f"| {reader} | {MODES[mode]} | {row['in_flight']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def server_table(rows: dict, columns: list[str]) -> str:
    """Cores the mount's server kept busy during each row, per mounted condition."""
    mounted = [c for c in columns if c != "local disk"]
    lines = ["| mount server, cores busy | mode | " + " | ".join(mounted) + " |",
             "|---|---|" + "---:|" * len(mounted)]
    for (reader, mode), row in rows.items():
        cells = [f"{row[SERVER + c]:.2f}" if SERVER + c in row else "-" for c in mounted]
        lines.append(f"| {reader} | {MODES[mode]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(cost: dict) -> str:
    local, mounted = cost.get("local disk", {}), cost.get("mount +0 ms", {})
    lines = ["| small files, open + read + close (files/s) | local disk | mount +0 ms | mount / local |",
             "|---|---:|---:|---:|"]
    for name in local:
        a, b = local[name], mounted.get(name)
        ratio = f"{b / a:.2f}" if b else "-"
        lines.append(f"| {name} | {cell(a, None)} | {cell(b, None)} | {ratio} |")
    return "\n".join(lines)


def report(args, res: dict, data: str, load_before: float) -> str:
    columns = [c for c, _ in conditions(args.latencies)]
    return "\n".join([
        f"### {datetime.date.today().isoformat()}, commit {git_commit()}", "",
        f"- machine: {machine('cpu')}; load average before the run {load_before:.1f}, "
        f"after {os.getloadavg()[0]:.1f}",
        f"- command: `{shlex.join(['python', *args.argv])}`",
        f"- data: {data}; shards of <= {args.shard_size}; every condition reads the same files",
        f"- loaders: batch {args.batch} originals; DALI on the CPU, num_threads={args.threads}, "
        f"prefetch={args.prefetch}; webdataset: {args.workers} DataLoader workers; RRC {args.crop} + flip + "
        f"4 rotations, uint8 out; each figure: {args.warmup} warm-up steps, then "
        + f"{args.seconds:g} s" + (f"; the median of {args.rounds} rounds over all conditions in turn"
                                   if args.rounds > 1 else ""),
        "- mount: benchmarks/latency_fs.py (C server, libfuse3, direct_io: no page cache for file data, "
        f"up to {args.mount_threads} requests at once), +latency per open, read, getattr and readdir; "
        "bandwidth cap: "
        + (f"{args.bandwidth_mbps:g} MB/s, all reads together" if args.bandwidth_mbps else "none"), "",
        table(res["rows"], columns), "", server_table(res["rows"], columns), "", cost_table(res["cost"]), ""])


def get_parser():
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--pool", required=True, help="image folder SPLIT/CLASS/IMAGE the subset is drawn from, "
                    "e.g. ../shared/datasets/imagenette-224/train")
    ap.add_argument("--images", type=int, default=3000, help="images in the subset")
    ap.add_argument("--work", default="", help="where the re-encoded folder and its shards are kept "
                    "(default: $ROTNET_CACHE/storage-bench/<images>, else ~/.cache/rotnet/...)")
    ap.add_argument("--shard-size", type=int, default=250, help="images per tar shard")
    ap.add_argument("--latencies", default="0,0.5,1,2,5", help="added ms per round trip, one mount each")
    ap.add_argument("--bandwidth-mbps", type=float, default=0.0,
                    help="the mounts' cap on all reads together, MB/s (0: none)")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per figure")
    ap.add_argument("--rounds", type=int, default=1,
                    help="passes over all conditions in turn (all mounted at once); each cell is the "
                         "median of its rounds. Use 3 where a share of the +0 ms figure decides something")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each figure")
    ap.add_argument("--batch", type=int, default=64, help="original images per step")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2, help="DALI num_threads")
    ap.add_argument("--workers", type=int, default=2,
                    help="DataLoader workers (webdataset), encoding processes")
    ap.add_argument("--prefetch", type=int, default=2, help="batches queued ahead")
    ap.add_argument("--readers", default="",
                    help="rows to run, comma-separated name prefixes ('rotnet', 'rotnet shards,DALI'); "
                         "default: every row")
    ap.add_argument("--reads-in-flight", type=int, default=LoaderConfig.reads_in_flight,
                    help="rotnet rows: loader.reads_in_flight (reads kept outstanding per rank)")
    ap.add_argument("--mount-threads", type=int, default=latency_fs.LinkSettings.threads,
                    help="requests the mount serves at once (its FUSE threads)")
    ap.add_argument("--cost-files", type=int, default=2000,
                    help="small files read for the mount's own cost")
    ap.add_argument("--cost-threads", type=int, default=32,
                    help="threads of the concurrent small-file figure")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap


def parse_args(argv=None):
    """The parsed settings, --quick applied, latencies parsed and the work folder resolved."""
    args = get_parser().parse_args(argv)
    args.argv = ["benchmarks/storage.py", *(sys.argv[1:] if argv is None else argv)]
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    args.latencies = parse_latencies(args.latencies)
    asked = [a.strip().lower() for a in args.readers.split(",") if a.strip()]
    args.readers = [r for r in READERS if not asked or any(r.lower().startswith(a) for a in asked)]
    if not args.readers:
        raise StorageError(f"--readers {','.join(asked)}: no row starts with that; "
                           f"rows: {', '.join(READERS)}")
    for key in ("images", "shard_size", "batch", "threads", "workers", "prefetch", "cost_files",
                "cost_threads", "mount_threads", "rounds"):
        if getattr(args, key) < 1:
            raise StorageError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be at least 1")
    if args.seconds <= 0 or args.warmup < 0 or args.bandwidth_mbps < 0:
        raise StorageError("--seconds must be > 0, --warmup and --bandwidth-mbps >= 0")
    args.pool = os.path.abspath(args.pool)
    args.work = os.path.abspath(args.work or os.path.join(cache_root(), "storage-bench", str(args.images)))
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if not os.path.isdir(args.pool):
            raise StorageError(f"--pool {args.pool!r}: folder not found")
        if shutil.which("fusermount3") is None:
            raise StorageError("no fusermount3: run `bash benchmarks/setup_storage.sh` first")
        load_before = os.getloadavg()[0]
        folder, _ = prepare(args)
        data = image_set.describe(Path(folder))
        res = run(args)
    except InputError as e:
        fail(e)
    text = report(args, res, data, load_before)
    publish(text, args.out, HEADING, INTRO, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
