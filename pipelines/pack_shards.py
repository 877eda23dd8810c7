"""Pack an image folder into tar shards (webdataset layout) for shared filesystems.

Then train with `data.format=shards`: shared filesystems see a few hundred opens, not one per image.
Resumable: a rerun with the same settings skips complete shards. Nothing is decoded: run
`python -m pipelines.scan SPLIT_DIR --out LIST` and pass --file-list LIST. See docs/pipelines.md.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed

from pipelines import listing
from pipelines.batch import derive_seed
from pipelines.listing import INDEX_VERSION, LABEL_EXT, MANIFEST, BadImageError, list_images, shard_files
from rotnet.atomic import TMP, atomic_path, write_text
from rotnet.checkpoint import git_commit
from rotnet.cli import ArgumentParser, InputError, UsageError, one_line_errors
from rotnet.runlock import own_folder

PLAN = ".plan.json"
# Member extension per source extension; decoders read the content, so a PNG named .JPEG still decodes.
IMAGE_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".ppm": "ppm", ".bmp": "bmp", ".pgm": "pgm",
             ".tif": "tiff", ".tiff": "tiff", ".webp": "webp"}


def member_key(position: int) -> str:
    """Sample key: its position in packed order (digits only: no dot, so the extension is clear)."""
    return f"{position:09d}"


def index_text(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """Index of a tar (read by pipelines.listing.read_index and DALI): per sample its members as
    (ext, data offset, size, member name)."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in s) for s in samples]
    return "\n".join(lines) + "\n"


def make_plan(split_dir: str, file_list: str, shard_size: int, seed: int) -> tuple[dict, list[list[tuple]]]:
    """(record: settings + listing digest, per shard [(source path, label, packed position)])."""
    paths, labels, classes = list_images(split_dir, file_list)
    odd = [p for p in paths if os.path.splitext(p)[1].lower() not in IMAGE_EXT]
    if odd:
        raise UsageError(f"{odd[0]!r}: not an image extension ({', '.join(IMAGE_EXT)}); {len(odd)} in all")
    digest = hashlib.sha256()
    for p, lab in zip(paths, labels):
        digest.update(f"{os.path.relpath(p, split_dir)}\t{lab}\n".encode("utf-8", "surrogateescape"))
    order = list(range(len(paths)))
    random.Random(derive_seed(seed, "pack")).shuffle(order)
    members = [(paths[i], labels[i], pos) for pos, i in enumerate(order)]
    shards = [members[k:k + shard_size] for k in range(0, len(members), shard_size)]
    record = {"source": split_dir, "file_list": os.path.abspath(file_list) if file_list else "",
              "seed": seed, "shard_size": shard_size, "count": len(paths), "classes": classes,
              "listing_sha256": digest.hexdigest(), "version": listing.FORMAT_VERSION}
    return record, shards


def check_plan(out: str, record: dict) -> None:
    """Record the plan in `out`, or refuse when `out` already holds one of other settings."""
    path = os.path.join(out, PLAN)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except ValueError:   # edited by hand, or not written by this packer
            raise UsageError(f"--out {out!r}: {PLAN} is not JSON; delete the folder to repack") from None
        differ = [k for k in record if old.get(k) != record[k]]
        if differ:
            k = differ[0]
            raise UsageError(f"--out {out!r} holds shards packed with other settings ({', '.join(differ)} "
                             f"differ: {k} was {old.get(k)!r}, now {record[k]!r}); use another --out, or "
                             "delete it to repack")
        return
    if os.path.exists(os.path.join(out, MANIFEST)) or any(n.endswith(".tar") for n in os.listdir(out)):
        raise UsageError(f"--out {out!r} holds tar shards without {PLAN} (not this packer's?): use another")
    write_text(path, json.dumps(record, indent=1))


def tar_bytes(samples: list[dict]) -> int:
    """Size of a tar whose index is `samples` (data 512-aligned, two zero blocks, whole 10 KiB records)."""
    end = max((off + size for s in samples for off, size, _ in s.values()), default=0)
    end = -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def shard_complete(out: str, i: int, count: int) -> bool:
    """Shard i is under its final name, with an index of `count` samples that accounts for its size."""
    tar, idx = (os.path.join(out, n) for n in shard_files(i))
    if not (os.path.isfile(tar) and os.path.isfile(idx)):
        return False
    try:
        samples = listing.read_index(idx)
    except (ValueError, OSError):
        return False
    return len(samples) == count and os.path.getsize(tar) == tar_bytes(samples)


def planned_bytes(members: list[tuple]) -> int:
    """The size shard `members` will have as a tar (0 if a file cannot be stat'ed: write_shard says why),
    for the message of a full disk."""
    def blocks(n: int) -> int:   # a header block, then the data padded to whole blocks
        return tarfile.BLOCKSIZE + -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    try:
        end = sum(blocks(os.path.getsize(path)) + blocks(len(str(label))) for path, label, _ in members)
    except OSError:
        return 0
    return -(-(end + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def write_shard(out: str, i: int, members: list[tuple]) -> tuple[int, int]:
    """Write shard i (tar, then index, then the tar's rename: a final name has its index) -> (i, bytes)."""
    tar_name, idx_name = shard_files(i)
    index = []
    with atomic_path(os.path.join(out, tar_name), size=planned_bytes(members)) as tmp_tar:
        with open(tmp_tar, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for path, label, pos in members:
                key = member_key(pos)
                ext = IMAGE_EXT[os.path.splitext(path)[1].lower()]
                try:
                    with open(path, "rb") as src:
                        image = src.read()
                except OSError as e:   # vanished, no permission, a dangling link
                    raise BadImageError(f"cannot read {path!r}: {e.strerror or e}") from None
                sample = []
                for name, data in ((f"{key}.{ext}", image), (f"{key}.{LABEL_EXT}", str(label).encode())):
                    info = tarfile.TarInfo(name)   # fixed metadata: the same input packs to the same bytes
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    sample.append((name.split(".", 1)[1], tf.offset + tarfile.BLOCKSIZE, len(data), name))
                    tf.addfile(info, io.BytesIO(data))
                index.append(sample)
        write_text(os.path.join(out, idx_name), index_text(index))   # before the tar's rename
    return i, os.path.getsize(os.path.join(out, tar_name))


def pack(split_dir: str, out: str, shard_size: int, workers: int, seed: int = 0, file_list: str = "") -> dict:
    """Pack `split_dir` into `out`; returns the manifest."""
    split_dir, out = os.path.abspath(split_dir), os.path.abspath(out)
    if not os.path.isdir(split_dir):
        raise UsageError(f"image folder not found: {split_dir!r}")
    if shard_size < 1 or workers < 1:
        raise UsageError(f"--shard-size {shard_size} and --workers {workers} must be at least 1")
    if out == split_dir or out.startswith(split_dir + os.sep):
        raise UsageError(f"--out {out!r} is inside {split_dir!r}: it would be listed as a class folder")
    record, shards = make_plan(split_dir, file_list, shard_size, seed)
    # one packer per folder (FolderBusyError naming the other): _fill's cleanup would delete the temp
    # files a live packer is about to rename
    with own_folder(out, "--out"):
        try:
            check_plan(out, record)
        except OSError as e:   # a read-only place
            raise UsageError(f"--out {out!r}: cannot write there ({e.strerror or e})") from None
        return _fill(out, record, shards, workers)


def _fill(out: str, record: dict, shards: list[list[tuple]], workers: int) -> dict:
    """Write the shards `out` lacks, then the manifest; returns it."""
    for name in os.listdir(out):          # leftovers of a killed run (never under a final name)
        if name.startswith(TMP):
            os.remove(os.path.join(out, name))
    todo = [i for i, m in enumerate(shards) if not shard_complete(out, i, len(m))]

    def done(n: int, i: int, size: int) -> None:
        mib = size / 2**20
        print(f"{shard_files(i)[0]}: {len(shards[i])} images, {mib:.1f} MiB ({n}/{len(todo)})", flush=True)

    if workers == 1 or len(todo) <= 1:
        for n, i in enumerate(todo, 1):
            done(n, *write_shard(out, i, shards[i]))
    else:
        with ProcessPoolExecutor(min(workers, len(todo))) as ex:
            futures = [ex.submit(write_shard, out, i, shards[i]) for i in todo]
            try:
                for n, fut in enumerate(as_completed(futures), 1):
                    done(n, *fut.result())
            except BaseException:
                for fut in futures:
                    fut.cancel()          # the running ones finish (or clean up after themselves)
                raise
    entries = []
    for i, members in enumerate(shards):
        tar, idx = shard_files(i)
        size = os.path.getsize(os.path.join(out, tar))
        entries.append({"tar": tar, "index": idx, "count": len(members), "bytes": size,
                        "labels": [lab for _, lab, _ in members]})
    manifest = {"format": listing.FORMAT, "version": listing.FORMAT_VERSION,
                "tool": "python -m pipelines.pack_shards", "tool_commit": git_commit(),
                **{k: record[k] for k in ("count", "classes", "source", "file_list", "seed", "shard_size")},
                "shards": entries}
    write_text(os.path.join(out, MANIFEST), json.dumps(manifest, separators=(",", ":")))
    print(f"{out}: {len(shards)} shards, {record['count']} images ({len(shards) - len(todo)} shards were "
          f"already complete), {sum(e['bytes'] for e in entries) / 2**20:.1f} MiB")
    return manifest


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m pipelines.pack_shards", description=__doc__)
    ap.add_argument("split_dir", help="image folder SPLIT/CLASS/IMAGE, e.g. /data/imagenet/train")
    ap.add_argument("--out", required=True, help="shard folder to write, e.g. /scratch/in-shards/train; then "
                    "data.root=/scratch/in-shards data.format=shards")
    ap.add_argument("--shard-size", type=int, default=5000,
                    help="images per shard (default 5000: ~550 MB of ImageNet JPEGs; a few hundred tars)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shards written in parallel")
    ap.add_argument("--seed", type=int, default=0, help="seed of the order of samples across shards")
    ap.add_argument("--file-list", default="", help="pack only this list's images (`python -m pipelines.scan "
                    "SPLIT_DIR --out LIST` writes one without the undecodable files)")
    args = ap.parse_intermixed_args(argv)
    with one_line_errors(InputError):
        pack(args.split_dir, args.out, args.shard_size, args.workers, args.seed, args.file_list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
