"""Find the images training cannot decode before a long run, and write a file list without them.

ROOT is a split (ROOT/CLASS/IMAGE, or flat ROOT/IMAGE) or a dataset root (ROOT/SPLIT/CLASS/IMAGE).
Every image is checked the way training reads it: with DALI installed, decoded by DALI's CPU decoder to
RGB, in batches (an external_source pipeline; a batch that fails is decoded again one file at a time,
which names the bad ones, the decoder checked on a known-good JPEG); without DALI, decoded as the torch
backends decode it (`pipelines.recipe.decode_rgb`), since training without DALI uses them. Either way
the files DALI refuses are refused (`pipelines.batch.by_rule`: empty files, no format DALI reads, JPEGs
and PNGs cut short, a 0 width or height, a WebP DALI misreads, before decoding). Bad ones are
printed, the good ones listed in --out for `data.file_list` (a flat split gets no list: no labels). Exit
status 1 when bad files were found.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from pipelines import listing
from pipelines.batch import by_rule
from pipelines.listing import SplitLayoutError, class_folders, find_images, is_image_file, split_layout
from rotnet.cli import ArgumentParser, InputError, number, one_line_errors

BATCH = 64   # images a DALI scan decodes at once


def dali_available() -> bool:
    """Whether nvidia.dali imports: the scan decodes with it, and loader.backend=auto picks it."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _dali_decoder(workers: int):
    """A DALI CPU pipeline: encoded bytes fed as "encoded" -> RGB images, decoded as training does."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=BATCH, num_threads=workers, device_id=None, prefetch_queue_depth=1)
    def graph():
        return fn.decoders.image(fn.external_source(name="encoded", dtype=types.UINT8), device="cpu",
                                 output_type=types.RGB)
    pipe = graph()
    pipe.build()
    return pipe


@functools.cache
def _control() -> bytes:
    """A small JPEG that every decoder reads: a decoder that fails on it is broken, whatever the file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, "JPEG")
    return buf.getvalue()


@contextlib.contextmanager
def dali_decoding(workers: int):
    """Yields decode(samples) -> None, or DALI's error decoding `samples` (encoded bytes) as one batch
    with its CPU decoder, as training does. Errors that are never a file's (memory, CUDA, a missing
    codec) are raised. A failed pipeline is spent: the next call builds another. The last pipeline is
    freed on leaving, even through an exception: one a traceback kept alive would be freed later, maybe
    in a forked DataLoader worker, where DALI's shutdown hangs."""
    from pipelines.dali_graph import may_be_a_file

    held = {}

    def decode(samples: list) -> RuntimeError | None:
        try:
            held["pipe"] = held.get("pipe") or _dali_decoder(workers)
            held["pipe"].feed_input("encoded", [np.frombuffer(s, dtype=np.uint8) for s in samples])
            held["pipe"].run()
            return None
        except RuntimeError as e:
            held.clear()
            if not may_be_a_file(str(e)):
                raise
            return e
    try:
        yield decode
    finally:
        held.clear()


def dali_verdicts(samples: list[bytes], decode) -> list[str]:
    """'' or why training cannot decode each of `samples` (encoded bytes): the rules first (`by_rule`),
    then `decode` (`dali_decoding`) BATCH at a time. DALI names no sample when a batch fails, so that batch
    is decoded again one sample at a time. A sample that fails alone is its file's fault, unless the
    decoder then fails on a known-good JPEG too: that error is raised, as a broken decoder's."""
    from pipelines.dali_graph import decoder_said, is_decode_failure

    reasons = [by_rule(s) for s in samples]
    todo = [i for i, why in enumerate(reasons) if not why]
    for lo in range(0, len(todo), BATCH):
        part = todo[lo:lo + BATCH]
        if decode([samples[i] for i in part]) is None:
            continue
        for i in part:
            error = decode([samples[i]])
            if error is None:
                continue
            if not is_decode_failure(str(error)) and decode([_control()]) is not None:
                raise error
            reasons[i] = f"DALI cannot decode it ({decoder_said(str(error))})"
    return reasons


def dali_reasons(paths: list[str], workers: int) -> list[str]:
    """'' or the reason for each of `paths` (`dali_verdicts`), read and decoded BATCH files at a time."""
    reasons = [""] * len(paths)
    with dali_decoding(workers) as decode:
        for start in range(0, len(paths), BATCH):
            read = {}
            for i in range(start, min(start + BATCH, len(paths))):
                try:
                    with open(paths[i], "rb") as f:
                        read[i] = f.read()
                except OSError as e:
                    reasons[i] = f"cannot be read: {e.strerror or e}"
            for i, why in zip(read, dali_verdicts(list(read.values()), decode)):
                reasons[i] = why
    return reasons


def scan_split(split_dir: str, workers: int, decoder: str = "dali") -> tuple[list[str], list[int],
                                                                         list[tuple[str, str]], int]:
    """(good relative paths, their labels, [(bad path, reason)], non-image files skipped); `decoder`:
    "dali" (DALI's CPU decoder) or "torch" (the torch backends' `decode_rgb`)."""
    from pipelines.recipe import image_problem  # torchvision and OpenCV: imported when a scan runs

    paths, labels, _ = find_images(split_dir, labelled=False)   # a 0-byte file is reported, not refused
    skipped = sum(1 for dp, _, fs in os.walk(split_dir) for f in fs if not is_image_file(f))
    if decoder == "dali":
        reasons = dali_reasons(paths, workers)
    elif workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            reasons = list(ex.map(image_problem, paths, chunksize=256))
    else:
        reasons = [image_problem(p) for p in paths]
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
    ap.add_argument("--workers", type=number(int, 1), default=os.cpu_count() or 1,
                    help="decoding threads (DALI) or processes (torch) (default: every CPU core)")
    ap.add_argument("--decoder", choices=("auto", "dali", "torch", "pil"), default="auto",
                    help="auto (default): DALI's CPU decoder when DALI is installed, else torch: the torch "
                         "backends' decoder, which trains without DALI (pil: its former name)")
    args = ap.parse_intermixed_args(argv)
    any_bad = False
    with one_line_errors(InputError):   # a missing ROOT, an ambiguous layout, an unwritable --out
        decoder = {"pil": "torch"}.get(args.decoder, args.decoder)   # DALI is imported only to use it
        if decoder == "auto":
            decoder = "dali" if dali_available() else "torch"
        elif decoder == "dali" and not dali_available():
            raise InputError("--decoder dali: nvidia.dali does not import (install it, or --decoder torch)")
        print("decoding with " + ("DALI's CPU decoder, as training does" if decoder == "dali" else
                                  "the torch backends' decoder, as training without DALI does; files DALI "
                                  "refuses are refused"), flush=True)
        todo = splits(os.path.abspath(args.root))   # every layout check before anything is written
        for split_dir in todo:
            name = os.path.basename(split_dir)
            flat = split_layout(split_dir) == listing.FLAT
            good, labels, bad, skipped = scan_split(split_dir, args.workers, decoder)
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
