"""Find the images training cannot decode before a long run, and write a file list without them.

ROOT is a split (ROOT/CLASS/IMAGE, or flat ROOT/IMAGE) or a dataset root (ROOT/SPLIT/CLASS/IMAGE).
Every image is checked the way training reads it: with DALI installed, decoded by DALI's CPU decoder to
RGB, in batches (an external_source pipeline; a batch that fails is decoded again one file at a time,
which names the bad ones, the decoder checked on a known-good JPEG); without DALI, decoded with PIL, and
what PIL reads but DALI does not (a GIF, a TIFF of signed or 32-bit integer samples) is refused by rule.
Empty files, files whose first bytes are no format DALI reads, JPEGs cut short (no end-of-image marker)
and JPEGs or PNGs whose header declares a 0 width or height are refused before decoding. Bad ones are
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

from pipelines import dali_available, listing
from pipelines.listing import SplitLayoutError, class_folders, find_images, is_image_file, split_layout
from rotnet.cli import ArgumentParser, InputError, one_line_errors

# Leading bytes of the formats DALI's decoder reads: JPEG, PNG, BMP, TIFF, PNM, JPEG 2000 (and WebP,
# in `format_problem`). PIL reads more (GIF); training would stop at those.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*",
          b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")
BATCH = 64   # images a DALI scan decodes at once


def format_problem(head: bytes) -> str:
    """'' when `head` (a file's first 12 bytes) starts like a format DALI's decoder reads, else why not."""
    if not head:
        return "empty (0-byte) file"
    if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return ""
    if head.startswith(b"GIF8"):
        return "a GIF, which DALI's decoder (training's) cannot read: convert it to JPEG or PNG"
    return f"not an image format DALI reads (it starts with {head[:8]!r})"


def jpeg_truncated(data: bytes) -> str:
    """Why a JPEG's bytes stop before its end-of-image marker (EOI after the last start-of-scan), else ''.

    DALI's CPU decoder refuses such a file, but given one inside a batch it can also crash the
    process (a segfault, in about one batch of 50 here), so the scan and the DALI loaders' feed
    refuse it by rule before DALI sees it. Bytes after EOI (camera trailers) are allowed, as DALI
    allows them."""
    if not data.startswith(b"\xff\xd8\xff"):
        return ""
    if data.endswith(b"\xff\xd9") and data.find(b"\xff\xda") >= 0:   # the usual case, found near the start
        return ""
    sos = data.rfind(b"\xff\xda")
    if sos < 0 or data.find(b"\xff\xd9", sos) < 0:
        return "a truncated JPEG (no end-of-image marker after its image data): copy it again or remove it"
    return ""


# JPEG frame header markers (SOF0-3, 5-7, 9-11, 13-15: baseline, progressive, lossless, ...); C4, C8 and
# CC in that range are other segments (DHT, JPG, DAC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def zero_size(data: bytes) -> str:
    """Why a JPEG's frame header (SOF) or a PNG's IHDR declares a 0 width or height, else '' (also for
    other formats, and for headers this walk cannot follow: the decoder judges those).

    Alone in a batch, such a file makes DALI fail with nvImageCodec's "invalid parameter" status, which a
    wrong call (a bug) also gives, so that status cannot name the file. The header names it exactly: the
    scan refuses it by rule before DALI sees it, and the DALI loader checks the samples in flight for it
    when DALI fails so (a 0 height with a DNL marker is valid JPEG, but no decoder here reads it)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    elif data.startswith(b"\xff\xd8"):
        i, w, h = 2, 1, 1
        while i + 9 <= len(data) and data[i] == 0xFF:   # marker segments: FF, marker, 2-byte length
            marker = data[i + 1]
            if marker in _SOF:                          # FF Cn, length, precision, height, width
                h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
                break
            if marker in (0xDA, 0xD9):                  # image data (or its end) before any frame header
                break
            if marker == 0xFF:                          # a fill byte
                i += 1
            elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
                i += 2
            else:
                i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    else:
        return ""
    if w and h:
        return ""
    kind = "PNG" if data[:1] == b"\x89" else "JPEG"
    return f"a {kind} whose header declares a {w}x{h} (width x height) image, which DALI cannot decode: " \
           "re-encode it from its source or remove it"


def by_rule(data: bytes) -> str:
    """Why `data` (a file's bytes) is refused before any decoder sees it, else '': no format DALI reads,
    a JPEG cut short (DALI can crash on it), a 0 width or height (DALI cannot say which file)."""
    return format_problem(data[:12]) or jpeg_truncated(data) or zero_size(data)


def samples_problem(im) -> str:
    """Why DALI's decoder cannot decode `im` (opened by PIL) although DALI reads its format, else '': a
    TIFF of signed or 32-bit integer samples, which PIL opens as mode "I" (DALI: "Invalid sample_type").
    16-bit unsigned ("I;16") and float ("F") TIFFs decode in both."""
    if im.format == "TIFF" and im.mode == "I":
        return ("a TIFF of signed or 32-bit integer samples, which DALI's decoder (training's) cannot "
                "decode: convert it to 8 or 16-bit unsigned")
    return ""


def read_head(path: str) -> bytes | None:
    """The first 12 bytes of `path`, None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(12)
    except OSError:
        return None


def check_image(path) -> str:
    """'' if `path` (a path or a binary file) is a format DALI reads and decodes completely to RGB
    with PIL, else the reason: the scan without DALI."""
    from PIL import Image

    if isinstance(path, str):
        head = read_head(path)
        if head is None:
            return "cannot be read"
    else:
        head = path.read(12)
        path.seek(0)
    if format_problem(head):
        return format_problem(head)
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable: reopen to decode
            im.load()
            im.convert("RGB")
            return samples_problem(im)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(e).__name__}: {e}"


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
    "dali" (DALI's CPU decoder) or "pil" (PIL, and the formats DALI cannot read refused by rule)."""
    paths, labels, _ = find_images(split_dir, labelled=False)   # a 0-byte file is reported, not refused
    skipped = sum(1 for dp, _, fs in os.walk(split_dir) for f in fs if not is_image_file(f))
    if decoder == "dali":
        reasons = dali_reasons(paths, workers)
    elif workers > 1:
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
                    help="decoding threads (DALI) or processes (PIL) (default: every CPU core)")
    ap.add_argument("--decoder", choices=("auto", "dali", "pil"), default="auto",
                    help="auto (default): DALI's CPU decoder when DALI is installed, else PIL with the "
                         "formats DALI cannot read refused")
    args = ap.parse_intermixed_args(argv)
    any_bad = False
    with one_line_errors(InputError):   # a missing ROOT, an ambiguous layout, an unwritable --out
        decoder = args.decoder if args.decoder != "auto" else "dali" if dali_available() else "pil"
        if decoder == "dali" and not dali_available():
            raise InputError("--decoder dali: nvidia.dali cannot be imported (install it, or --decoder pil)")
        print("decoding with " + ("DALI's CPU decoder, as training does" if decoder == "dali" else
                                  "PIL (DALI not used); formats DALI cannot read are refused"), flush=True)
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
