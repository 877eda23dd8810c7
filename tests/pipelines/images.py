"""Test image folders written with PIL into tmp dirs (no binaries in git), and small configs."""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.scan import dali_available
from rotnet.config import LOADER_KEYS, Config, DataConfig, LoaderConfig

HAVE_DALI = dali_available()
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali not installed")
# Loader kinds every behaviour test runs on: (name, `cfg` keywords).
KINDS = [pytest.param(("dali", {"backend": "dali"}), id="dali", marks=needs_dali),
         pytest.param(("torch", {"backend": "torch"}), id="torch"),
         pytest.param(("resident", {"backend": "torch", "resident": True}), id="resident")]


# Formats a split can be read in: as the image folder, or packed into tar shards (data.format).
FORMATS = ["folder", "shards"]


def in_format(folder, fmt: str, shard_size: int = 5) -> str:
    """`folder` itself, or (fmt "shards") the shard folder it packs to (beside it, made once)."""
    if fmt == "folder":
        return str(folder)
    from pipelines.pack_shards import pack

    out = f"{folder}-shards"
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        pack(str(folder), out, shard_size=shard_size, workers=1)
    return out


def cfg(**kw) -> Config:
    """A small, fast Config for tests (1 thread/worker, 32 px crops); each keyword goes to the
    section that has it (data: what is read, loader: how)."""
    data = {**dict(crop_size=32, resize_size=32, num_threads=1, prefetch=1, min_scale=0.25), **kw}
    loader = {k: data.pop(k) for k in LOADER_KEYS if k in data}
    return Config(data=DataConfig(**data), loader=LoaderConfig(**loader))


def save_jpeg(path, arr, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=95, **kw)


def jpeg(array: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def encoded(array: np.ndarray, fmt: str, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, format=fmt, **save)
    return buf.getvalue()


def declaring(data: bytes, w: int, h: int) -> bytes:
    """`data` (a PIL-made PNG, or JPEG: baseline or progressive) with the size its header declares
    replaced by w x h; the image data is left as it is."""
    if data.startswith(b"\x89PNG"):   # IHDR: width, height, 5 more bytes
        return data[:8] + png_chunk(b"IHDR", struct.pack(">II", w, h) + data[24:29]) + data[33:]
    sof = data.index(b"\xff\xc2" if b"\xff\xc2" in data else b"\xff\xc0")   # FF Cn, length, precision, h, w
    return data[:sof + 5] + struct.pack(">HH", h, w) + data[sof + 9:]


def textured(rng, h, w):
    """Smooth random texture (survives JPEG well, and is not rotation symmetric)."""
    small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def make_folder(root, counts, size=(40, 40), seed=0, name="img {i} é.JPEG"):
    """ROOT/c{k}/<name> with counts[k] textured JPEGs per class (spaces + unicode in names)."""
    rng = np.random.default_rng(seed)
    for k, n in enumerate(counts):
        for i in range(n):
            save_jpeg(os.path.join(root, f"c{k}", name.format(i=i)), textured(rng, *size))
    return str(root)


def colour_of(i: int) -> tuple[int, int, int]:
    return (40 + 9 * (i % 20), 40 + 9 * (i // 20), 200 - 5 * (i % 7))


def make_colour_folder(root, n, classes=3, size=(36, 44)):
    """n solid-colour JPEGs; image i's colour identifies it after any crop/flip/rotation."""
    for i in range(n):
        arr = np.empty(size + (3,), dtype=np.uint8)
        arr[...] = colour_of(i)
        save_jpeg(os.path.join(root, f"c{i % classes}", f"{i:03d}.jpg"), arr)
    return str(root)


def identify(images: torch.Tensor, n: int) -> list[int]:
    """Indices of solid-colour images from uint8 (B, H, W, C) crops (nearest colour)."""
    table = torch.tensor([colour_of(i) for i in range(n)], dtype=torch.float32)
    means = images.float().mean(dim=(1, 2))
    return torch.cdist(means, table).argmin(dim=1).tolist()


def int32_tiff(h: int = 40, w: int = 50) -> bytes:
    """A 32-bit integer greyscale TIFF: PIL reads it; DALI's TIFF codec refuses it in words of its own
    ("Invalid sample_type: 8197"), with no status that blames a file."""
    buf, values = io.BytesIO(), np.random.default_rng(0).integers(0, 2**31 - 1, (h, w))
    Image.fromarray(values.astype(np.int32)).save(buf, "TIFF")
    return buf.getvalue()


def png_chunk_flipped(data: bytes, kind: bytes) -> bytes:
    """`data` (a PNG) with one byte of its first `kind` chunk's body flipped: its CRC no longer matches."""
    at = data.index(kind) + 4
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def png_chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk: length, type, body, CRC `crc` (default: the right one)."""
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_with_chunk(data: bytes, kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    """`data` (a PNG) with a `kind` chunk inserted after IHDR, its CRC `crc` (default: the right one)."""
    return data[:33] + png_chunk(kind, body, crc) + data[33:]


def corrupt_jpeg(data: bytes, at: int = 200) -> bytes:
    """`data` (a baseline JPEG) with 8 bytes of its image data, `at` bytes into the scan, replaced by a
    stray restart marker and Huffman-table start: libjpeg-turbo reads on with a warning, torchvision stops."""
    i = data.index(b"\xff\xda") + at
    return data[:i] + b"\xff\xd0\x00\x13\x77\xff\xc4\x01" + data[i + 8:]


def png_written(array: np.ndarray, filter_byte: int = 0) -> bytes:
    """A PNG written by hand (PIL writes no 16-bit colour): uint8 or uint16 (H, W[, C]), C 1-4 -> grey,
    grey+alpha, RGB, RGBA; every row's filter byte `filter_byte` (> 4: invalid, the CRCs still right)."""
    a = array if array.ndim == 3 else array[..., None]
    h, w, c = a.shape
    depth = 16 if a.dtype == np.uint16 else 8
    big_endian = a.astype(">u2" if depth == 16 else "u1")
    rows = b"".join(bytes([filter_byte]) + big_endian[y].tobytes() for y in range(h))
    color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def lossless_webp(odd: bool, exif: bytes = b"", seed: int = 0) -> bytes:
    """A lossless WebP whose image chunk (VP8L) has an odd (or even) length, with an EXIF chunk after it
    if `exif`: DALI's parser misreads the odd one with EXIF (pipelines.batch.webp_misread)."""
    rng = np.random.default_rng(seed)
    while True:
        buf = io.BytesIO()
        meta = {"exif": exif} if exif else {}
        Image.fromarray(textured(rng, 40, 48)).save(buf, "WEBP", lossless=True, **meta)
        data = buf.getvalue()
        at = data.index(b"VP8L")
        if int.from_bytes(data[at + 4:at + 8], "little") % 2 == odd:
            return data


def exif_orientation(orientation: int) -> bytes:
    """An EXIF block holding only an orientation tag, for PIL's save(exif=...)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()
