"""The FFCV rows of benchmarks/pipeline.py: FFCV 1.0.2 reading a .beton of the same images.

    batches = ffcv_batches(args, rotate)   # args: pipeline.py's; rotate: None (one view) or rotate4

FFCV reads its own file format, so the images of --data (class folders) are first written to a
.beton by FFCV's DatasetWriter, once, into $ROTNET_CACHE/ffcv/ (else ~/.cache/rotnet/ffcv/), not
timed. Its writer decodes each image and re-encodes it as JPEG (write_mode="jpg", full size, at
--ffcv-quality, by default the source's own, estimated from its first file's quantisation table), so
the .beton holds the same pixels at the same compression: the block notes the mean bytes per image
of both. Pipeline, as in FFCV's ImageNet example but on the CPU:
RandomResizedCropRGBImageDecoder (torchvision's scale/ratio), RandomHorizontalFlip,
NormalizeImage (ImageNet mean/std, float32; on the CPU it runs on the HWC arrays, so before
ToTensor), ToTensor, ToTorchImage (channels-last): float32 (N, 3, S, S), then `rotate`.
Install: benchmarks/requirements-ffcv.txt (docs/pipelines.md, Throughput, says how).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from benchmarks.image_set import image_files
from pipelines.sample_data import cache_root
from rotnet.config import DataConfig

# libjpeg's standard luminance table (quality 50); quality q scales it by 5000/q (q < 50) or 200 - 2q
# percent.
LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
        14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
        49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)


def luma_table(quality: int) -> list[int]:
    """libjpeg's luminance quantisation table at `quality` (1-100)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(max((v * scale + 50) // 100, 1), 255) for v in LUMA]


def jpeg_quality(path) -> int:
    """The libjpeg quality whose luminance table is nearest to this JPEG's (the writer's setting); 90,
    FFCV's default, for an image that is not a JPEG."""
    from PIL import Image

    with Image.open(path) as im:
        tables = getattr(im, "quantization", None)
    if not tables:
        return 90
    table = sorted(tables[0])
    return min(range(1, 101), key=lambda q: sum(abs(a - b) for a, b in zip(sorted(luma_table(q)), table)))


def beton_path(data: str, quality: int, files: list) -> str:
    """Cache path of the .beton of `data`: named by the folder and a digest of its file list and quality."""
    digest = hashlib.sha1(f"{os.path.abspath(data)}|{len(files)}|{files[-1]}|q{quality}".encode())
    name = f"{os.path.basename(os.path.normpath(data))}-q{quality}-{digest.hexdigest()[:10]}.beton"
    return str(cache_root() / "ffcv" / name)


def write_beton(data: str, path: str, quality: int, workers: int) -> None:
    """FFCV's DatasetWriter over torchvision's ImageFolder(data); written beside `path`, renamed in
    place, so a killed run leaves no half file under the final name."""
    import torchvision.datasets as datasets
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    ds = datasets.ImageFolder(data, loader=lambda p: np.asarray(datasets.folder.pil_loader(p)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=None, jpeg_quality=quality),
              "label": IntField()}
    DatasetWriter(tmp, fields, num_workers=workers).from_indexed_dataset(ds)
    os.replace(tmp, path)


def jpeg_kb(path: str) -> float:
    """Mean KB of the images stored in a .beton (its allocation table; the file has page padding too)."""
    from ffcv.reader import Reader

    return float(Reader(path).alloc_table["size"].mean()) / 1024


def ffcv_batches(args, rotate=None):
    """(float32 images, int64 labels) batches of FFCV on args.data, endlessly: (N, 3, S, S) channels-last
    and class labels, or with `rotate` (rotate4) (4N, 3, S, S) and rotation labels. Adds one line to
    args.notes about the .beton."""
    from importlib.metadata import version

    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    files = [str(f) for f in image_files(Path(args.data))]
    quality = args.ffcv_quality or jpeg_quality(files[0])
    path = beton_path(args.data, quality, files)
    if not os.path.exists(path):
        print(f"ffcv: writing {path} (once, not timed)", flush=True)
        write_beton(args.data, path, quality, args.threads)
    source_kb = sum(os.path.getsize(f) for f in files) / len(files) / 1024
    note = (f"FFCV {version('ffcv')} (numba {version('numba')}), .beton {os.path.basename(path)}: JPEG "
            f"quality {quality}, {jpeg_kb(path):.1f} KB per image (source files: {source_kb:.1f} KB); "
            "os_cache, batches_ahead=3")
    if note not in args.notes:
        args.notes.append(note)
    mean, std = np.array(DataConfig().mean) * 255, np.array(DataConfig().std) * 255
    image = [RandomResizedCropRGBImageDecoder((args.crop, args.crop)), RandomHorizontalFlip(),
             NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage(channels_last=True)]
    loader = Loader(path, batch_size=args.batch_size, num_workers=args.threads, order=OrderOption.RANDOM,
                    drop_last=True, seed=0, os_cache=True,
                    pipelines={"image": image, "label": [IntDecoder(), ToTensor()]})
    rot_labels = torch.arange(4).repeat(args.batch_size)
    while True:
        for x, y in loader:
            yield (rotate(x), rot_labels) if rotate else (x, y.flatten())
