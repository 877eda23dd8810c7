"""Find undecodable images before a long run, and write a file list without them.

ROOT is a split (ROOT/CLASS/IMAGE, or flat ROOT/IMAGE) or a dataset root (ROOT/SPLIT/CLASS/IMAGE).
Every image is fully decoded with PIL; bad ones are printed, the good ones listed in --out for
`data.file_list` (a flat split gets no list: no labels). Exit status 1 when bad files were found.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor

from pipelines import listing
from pipelines.listing import SplitLayoutError, class_folders, find_images, is_image_file, split_layout
from rotnet.cli import ArgumentParser, InputError, one_line_errors

# Leading bytes of formats the decoders read; anything else is certainly not an image.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*",
          b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"GIF8")


def header_ok(path: str) -> bool:
    """Cheap check: the file starts like an image (misses truncation, unlike `check_image`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def bad_headers(paths: list[str]) -> list[str]:
    """Paths whose first bytes are not an image's (used to name a file DALI did not name)."""
    return [p for p in paths if not header_ok(p)]


def check_image(path: str) -> str:
    """'' if `path` decodes completely to RGB, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable: reopen to decode
            im.load()
            im.convert("RGB")
        return ""
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(e).__name__}: {e}"


def scan_split(split_dir: str, workers: int) -> tuple[list[str], list[int], list[tuple[str, str]], int]:
    """(good relative paths, their labels, [(bad path, reason)], non-image files skipped)."""
    paths, labels, _ = find_images(split_dir, labelled=False)   # a 0-byte file is reported, not refused
    skipped = sum(1 for dp, _, fs in os.walk(split_dir) for f in fs if not is_image_file(f))
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            reasons = list(ex.map(check_image, paths, chunksize=256))
    else:
        reasons = [check_image(p) for p in paths]
    good, good_labels, bad = [], [], []
    for p, lab, why in zip(paths, labels, reasons):
        if why:
            bad.append((p, why))
        else:
            good.append(os.path.relpath(p, split_dir))
            good_labels.append(lab)
    return good, good_labels, bad, skipped


# Sub-folder names that say "split", not "class": ROOT/train/IMG + ROOT/val/IMG is two flat splits.
SPLIT_NAMES = {"train", "val", "valid", "validation", "test"}


def splits(root: str) -> list[str]:
    """[root] when it is a split (class folders, or flat), else its split sub-folders; ambiguous: refused."""
    if split_layout(root) != listing.CLASSES:   # flat: scanned unlabelled; mixed, empty: list_images says why
        return [root]
    layouts = {os.path.join(root, c): split_layout(os.path.join(root, c)) for c in class_folders(root)}
    nested = [s for s, lay in layouts.items() if lay == listing.CLASSES]
    loose = [s for s, lay in layouts.items() if lay not in (listing.CLASSES, listing.EMPTY)]   # images inside
    if nested and loose:
        raise SplitLayoutError(
            f"{root!r} mixes splits of class folders ({', '.join(map(os.path.basename, nested[:3]))}) "
            f"and folders of loose images ({', '.join(map(os.path.basename, loose[:3]))}): scan each split "
            f"on its own (python -m pipelines.scan {loose[0]}); {listing.CONVERT_HINT}")
    if nested:
        return nested                       # a dataset root; an empty sub-folder is no split
    names = sorted(map(os.path.basename, layouts))
    if set(names) <= SPLIT_NAMES:
        raise SplitLayoutError(f"the sub-folders of {root!r} ({', '.join(names)}) are named like splits but "
                               "hold images directly, like classes: scan each split on its own "
                               f"(python -m pipelines.scan {next(iter(layouts))})")
    return [root]                           # a split: its sub-folders are classes


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m pipelines.scan", description=__doc__)
    ap.add_argument("root", help="split ROOT/CLASS/IMG (or flat ROOT/IMG) or dataset ROOT/SPLIT/CLASS/IMG")
    ap.add_argument("--out", default="file_lists/{split}.txt", help="file list to write, {split} -> split "
                    "name (default: file_lists/{split}.txt); then set data.file_list to this value")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="decoding processes (default: every CPU core)")
    args = ap.parse_intermixed_args(argv)
    any_bad = False
    with one_line_errors(InputError):   # a missing ROOT, an ambiguous layout, an unwritable --out
        todo = splits(os.path.abspath(args.root))   # every layout check before anything is written
        for split_dir in todo:
            name = os.path.basename(split_dir)
            flat = split_layout(split_dir) == listing.FLAT
            good, labels, bad, skipped = scan_split(split_dir, args.workers)
            for p, why in bad:
                print(f"BAD {p}: {why}")
            out = "no file list for a flat split (no labels)" if flat else args.out.replace("{split}", name)
            if not flat:
                listing.write_file_list(out, good, labels)
            print(f"{name}: {len(good)} good, {len(bad)} bad, {skipped} non-image files skipped -> {out}")
            any_bad |= bool(bad)
    return 1 if any_bad else 0


if __name__ == "__main__":
    sys.exit(main())
