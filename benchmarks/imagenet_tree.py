"""An ImageNet-shaped tree on local disk that costs inodes, not bytes: every image a hard link.

    python benchmarks/imagenet_tree.py --scale 0.1 --pool DIR [--out DIR] [--remove]

OUT/scale-<s>/ (s = 1, 0.1, 0.01) gets what ILSVRC2012 extracts to, at `--scale` of its size:
  train/<wnid>/<wnid>_<k>.JPEG  1,000 class folders, per-class counts from `class_counts`
                                (1,281,167 files at scale 1, 732 to 1,300 per class)
  val/ILSVRC2012_val_<8 digits>.JPEG   one flat folder, 50,000 files at scale 1, 50 per class
  LOC_val_solution.csv          Kaggle's label file for val/ (read by `python -m pipelines.imagenet_val`)
  .pool/                        the JPEGs every file above is a hard link to (same file system)
  .imagenet_tree.json           what was built; a tree without it is never replaced or removed

The exact per-class table is not at hand, so the counts are a fixed, seeded table with the real
range and total: most classes at 1,300 (as in ImageNet), one at 732, the rest lowered at random
until the total is 1,281,167. The wnids are made up (n + 8 digits, sorted order = class index).
The pool is `--pool-count` images of the given folder (Imagenette's train split), re-encoded at
ImageNet's usual sizes (--pool-px 500: 500x375, 375x500, 500x333, 500x500), so decode and crop
costs are ImageNet's; --pool-px 0 links the originals as they are. 100 pool files keep every
file's link count (13k at scale 1) under ext4's 65,000 links per inode.
The tree is built beside OUT/scale-<s> and renamed into place, so a killed run leaves no half tree
under the final name; a second call with the same settings reuses it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipelines.listing import is_image_file  # noqa: E402
from pipelines.sample_data import cache_root  # noqa: E402
from rotnet.cli import ArgumentParser, InputError, fail  # noqa: E402

TRAIN_TOTAL = 1_281_167
CLASSES = 1000
PER_CLASS_MAX, PER_CLASS_MIN = 1300, 732
VAL_PER_CLASS = 50
MANIFEST = ".imagenet_tree.json"
DEFAULT_TREES = cache_root() / "scale-tree"   # 1.33M hard links at scale 1: never inside the repo
SHAPES = ((500, 375), (375, 500), (500, 333), (500, 500))   # (width, height) at --pool-px 500


class TreeError(InputError):
    """The pool folder or the output folder does not fit; the message names it."""


def class_counts(seed: int = 0) -> list[int]:
    """Train images per class at scale 1 (1,000 ints, sum 1,281,167, min 732, max 1,300); seeded."""
    rng = random.Random(seed)
    counts = [PER_CLASS_MAX] * CLASSES
    counts[rng.randrange(CLASSES)] = PER_CLASS_MIN
    missing = sum(counts) - TRAIN_TOTAL
    while missing > 0:
        c = rng.randrange(CLASSES)
        cut = min(missing, counts[c] - PER_CLASS_MIN, rng.randrange(1, 400))
        counts[c] -= cut
        missing -= cut
    return counts


def wnids(seed: int = 0) -> list[str]:
    """1,000 made-up, sorted WordNet ids ('n01234567')."""
    return [f"n{v:08d}" for v in sorted(random.Random(seed).sample(range(1_000_000, 16_000_000), CLASSES))]


def scaled(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def plan(scale: float, seed: int) -> tuple[list[str], list[int], list[str]]:
    """(wnids, train images per class, the wnid of val image 1..V) at `scale`."""
    names = wnids(seed)
    train = [scaled(c, scale) for c in class_counts(seed)]
    val = [names[i % CLASSES] for i in range(scaled(VAL_PER_CLASS * CLASSES, scale))]
    random.Random(seed + 1).shuffle(val)
    return names, train, val


def make_pool(src: str, dest: str, count: int, px: int, seed: int) -> list[str]:
    """`count` images of `src` (SPLIT/CLASS/IMAGE or flat) in `dest`, re-encoded at ImageNet's sizes
    (px > 0) or hard-linked as they are (px 0). Returns the pool's file paths."""
    from PIL import Image

    found = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(src) for f in fs if is_image_file(f))
    if len(found) < count:
        raise TreeError(f"--pool {src!r} holds {len(found)} images; --pool-count {count} needs that many")
    os.makedirs(dest)
    pool = []
    for i, path in enumerate(random.Random(seed).sample(found, count)):
        out = os.path.join(dest, f"{i:04d}.JPEG")
        if px:
            w, h = SHAPES[i % len(SHAPES)]
            with Image.open(path) as im:
                im.convert("RGB").resize((w * px // 500, h * px // 500), Image.BILINEAR).save(out, quality=90)
        else:
            os.link(path, out)
        pool.append(out)
    return pool


def build(args) -> str:
    """Build OUT/scale-<s> unless a tree of the same settings is there; returns its path."""
    final = tree_path(args.out, args.scale)
    if not args.pool:
        raise TreeError(f"--pool is needed to build {final}: a folder of real JPEGs")
    settings = {"scale": args.scale, "seed": args.seed, "pool": os.path.abspath(args.pool),
                "pool_count": args.pool_count, "pool_px": args.pool_px}
    if os.path.exists(final):
        if read_manifest(final) != settings:
            raise TreeError(f"{final} exists but was not built with these settings: --remove it first")
        return final
    part = final + ".partial"
    if os.path.exists(part):
        shutil.rmtree(part)       # a killed earlier build: ours by its name
    pool = make_pool(args.pool, os.path.join(part, ".pool"), args.pool_count, args.pool_px, args.seed)
    names, train, val = plan(args.scale, args.seed)
    n = 0
    for wnid, count in zip(names, train):
        folder = os.path.join(part, "train", wnid)
        os.makedirs(folder)
        for k in range(1, count + 1):
            os.link(pool[n % len(pool)], os.path.join(folder, f"{wnid}_{k}.JPEG"))
            n += 1
    os.makedirs(os.path.join(part, "val"))
    rows = ["ImageId,PredictionString\n"]
    for k, wnid in enumerate(val, 1):
        stem = f"ILSVRC2012_val_{k:08d}"
        os.link(pool[(n + k) % len(pool)], os.path.join(part, "val", stem + ".JPEG"))
        rows.append(f"{stem},{wnid} 0 0 223 223 \n")   # one box: the synset is the first token
    with open(os.path.join(part, "LOC_val_solution.csv"), "w") as f:
        f.writelines(rows)
    with open(os.path.join(part, MANIFEST), "w") as f:
        json.dump({**settings, "train": sum(train), "val": len(val)}, f)
    os.rename(part, final)
    return final


def tree_path(out: str, scale: float) -> str:
    return os.path.join(os.path.abspath(out), f"scale-{scale:g}")


def read_manifest(tree: str) -> dict | None:
    """The build settings of a tree this script made (counts left out), else None."""
    try:
        with open(os.path.join(tree, MANIFEST)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return {k: v for k, v in record.items() if k not in ("train", "val")}


def remove(out: str, scale: float) -> None:
    tree = tree_path(out, scale)
    if not os.path.exists(tree):
        return
    if read_manifest(tree) is None:
        raise TreeError(f"{tree} has no {MANIFEST}: not made by this script, so not removed")
    shutil.rmtree(tree)


def parse_scale(text: str) -> float:
    """'1', '0.1', '1/100' -> float in (0, 1]."""
    try:
        value = float(text.split("/")[0]) / float(text.split("/")[1]) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--scale {text!r}: give a number in (0, 1], e.g. 1, 0.1 or 1/100")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--scale {text!r}: give a number in (0, 1], e.g. 1, 0.1 or 1/100")
    return value


def get_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--scale", type=parse_scale, default=0.01,
                    help="fraction of ImageNet's file counts: 1/100 for tests, 1/10 and 1 for the benchmark")
    ap.add_argument("--out", default=str(DEFAULT_TREES),
                    help="parent folder of the trees, outside the repository: 1.33M links at scale 1 "
                         "(default $ROTNET_CACHE/scale-tree, else ~/.cache/rotnet/scale-tree)")
    ap.add_argument("--pool", default="",
                    help="folder of real JPEGs the pool is drawn from, e.g. "
                         "../shared/datasets/imagenette-224/train (on OUT's file system when --pool-px 0)")
    ap.add_argument("--pool-count", type=int, default=100,
                    help="pool files; keep scale-1 files / pool-count under 65,000 (ext4's links per inode)")
    ap.add_argument("--pool-px", type=int, default=500,
                    help="longer side of the re-encoded pool images (500: ImageNet's usual); "
                         "0 links the originals")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the counts, wnids, val labels and pool choice")
    ap.add_argument("--remove", action="store_true", help="delete the tree of --scale under --out, and stop")
    return ap


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        if args.remove:
            remove(args.out, args.scale)
            print(f"removed {tree_path(args.out, args.scale)}")
            return 0
        print(build(args))
    except InputError as e:
        fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
