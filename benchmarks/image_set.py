"""Describe an image set, or make an ImageNet-sized copy of one, for pipeline benchmarks.

    python benchmarks/image_set.py stats DIR                        # count, mean resolution, mean file size
    python benchmarks/image_set.py upscale SRC DST [--size 500x375] [--quality 90] [--workers N]

Why: decode cost grows with pixels, so an img/s figure means little without the images'
size beside it. Imagenette-224 JPEGs (224x224, ~20 KB) decode several times faster than
ImageNet's photos (mean ~400x350, ~110 KB), and the GPU machine has no ImageNet, so
`upscale` re-encodes each image of SRC (ImageNet layout SPLIT/CLASS/IMAGE) at an
ImageNet-like size and quality into DST, keeping the folder layout. The pixels are
upsampled, so the JPEGs compress a bit better than real photos of that size: the
stats line says what was made, and it is what gets reported.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

EXTS = {".jpg", ".jpeg", ".png"}


def image_files(root: Path) -> list[Path]:
    """Every image file under `root`, sorted (any depth)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTS)


def stats(root: Path) -> dict:
    """{'count', 'mean_w', 'mean_h', 'mean_kb'} of the images under `root` (headers only)."""
    from PIL import Image

    files = image_files(root)
    if not files:
        raise SystemExit(f"error: no images under {root}")
    w = h = size = 0
    for f in files:
        with Image.open(f) as im:     # reads the header, not the pixels
            w, h = w + im.width, h + im.height
        size += f.stat().st_size
    n = len(files)
    return {"count": n, "mean_w": w / n, "mean_h": h / n, "mean_kb": size / n / 1024}


def describe(root: Path) -> str:
    s = stats(root)
    return (f"{root}: {s['count']} images, mean {s['mean_w']:.0f}x{s['mean_h']:.0f} px, "
            f"mean {s['mean_kb']:.1f} KB")


def _upscale_one(job: tuple[Path, Path, int, int, int]) -> None:
    from PIL import Image

    src, dst, w, h, quality = job
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").resize((w, h), Image.BICUBIC).save(dst, "JPEG", quality=quality)


def upscale(src: Path, dst: Path, size: tuple[int, int], quality: int, workers: int) -> int:
    """Re-encode every image of `src` at `size` (w, h) into `dst`, same relative paths; returns count."""
    files = image_files(src)
    if not files:
        raise SystemExit(f"error: no images under {src}")
    jobs = [(f, (dst / f.relative_to(src)).with_suffix(".JPEG"), size[0], size[1], quality) for f in files]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_upscale_one, jobs, chunksize=32))
    return len(jobs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats", help="count, mean resolution and mean file size of the images under DIR")
    s.add_argument("dir", type=Path)
    u = sub.add_parser("upscale", help="ImageNet-sized JPEG copy of SRC in DST (same folder layout)")
    u.add_argument("src", type=Path)
    u.add_argument("dst", type=Path, help="must not exist yet (nothing is overwritten)")
    u.add_argument("--size", default="500x375", help="WxH of every output image; ImageNet's most common "
                   "size is 500x375 (default)")
    u.add_argument("--quality", type=int, default=90, help="JPEG quality (ImageNet's photos: ~90)")
    u.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    args = ap.parse_args(argv)
    if args.cmd == "stats":
        if not args.dir.is_dir():
            raise SystemExit(f"error: {args.dir} is not a folder")
        print(describe(args.dir))
        return 0
    if not args.src.is_dir():
        raise SystemExit(f"error: {args.src} is not a folder")
    if args.dst.exists():
        raise SystemExit(f"error: {args.dst} exists; pass a new folder (nothing is overwritten)")
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: --size {args.size!r}; expected WxH, e.g. 500x375") from None
    n = upscale(args.src, args.dst, (w, h), args.quality, args.workers)
    print(f"wrote {n} images; {describe(args.dst)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
