"""What a batch is: the contract every loader keeps, and the code that keeps it.

    loader = build_rotation_loader(cfg, split_dir, batch_size=N, train=True, seed=cfg.train.seed,
                                   info=info)   # info: this rank's rotnet.distributed.DistInfo
    for images, labels in loader:
        x = prepare_batch(images, cfg.data, channels_last=True)

Contract (every backend, every loader):
  images  uint8 (B, H, W, C) on `info.device` -- normalise in the trainer with `prepare_batch`;
          or float16 (B, C, H, W) already normalised, in channels-last memory, when the loader
          normalises itself (device cuda and loader.normalize "auto"/"graph", or "graph"
          anywhere); `prepare_batch(.., dtype=)` casts it to the model's input dtype.
  labels  int64 (B,) on `info.device`.
  rotation loader, mode "all": B = K*N (K = len(data.rotations), N = batch_size), sample-major:
          row K*i + r is original i rotated by data.rotations[r], label r.
          mode "one_random": K*N originals per step, one random rotation each, label = index.
  class loader: B = N original crops with class labels.
  len(loader) steps per epoch on this rank (equal on all ranks when train=True);
  .num_samples, .classes, .set_epoch(e), .state_dict(), .load_state_dict(s), .backend.

Kept here, once for every backend: the files a batch may hold (`by_rule`: what DALI's decoder refuses),
`LoaderSpec` (one loader's job), which samples a rank reads (`rank_indices`), every random stream's seed
(`derive_seed`), `assemble` (raw batch -> the contract), `LoaderBase` (steps, epochs, resume state),
`prepare_batch` and `batch_preparer` (the batch -> the model's input). A backend only makes raw batches.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import torch

from rotnet.cli import InputError

RECIPES = ("imagenet", "cifar")   # pipelines/recipe.py in torch ops (the reference), pipelines/dali_graph.py


def check_recipe(data) -> None:
    if data.recipe not in RECIPES:
        raise InputError(f"data.recipe={data.recipe!r}; expected one of {RECIPES}")


NORMALIZE_MODES = ("auto", "graph", "trainer")


def normalize_in_graph(mode: str, device: torch.device) -> bool:
    """True when the loader itself should emit normalised float16 (B, C, H, W), channels-last."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"loader.normalize={mode!r}; expected one of {NORMALIZE_MODES}")
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return mode == "graph"


@functools.cache
def _stats(mean: tuple, std: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) float32 (1, C, 1, 1) so that x*scale + shift == (x/255 - mean)/std."""
    mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(device)
    return scale, (-mean / std).view(1, -1, 1, 1).to(device)


def prepare_batch(images: torch.Tensor, data, channels_last: bool,
                  dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Loader images -> model input (B, C, H, W) in `dtype`, on the images' device: uint8 (B, H, W, C)
    -> (x/255 - mean)/std in float32; a float (B, C, H, W) batch is only cast (dtype=None: kept as is,
    for autocast). channels_last costs no copy for either."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if images.is_floating_point():
        if images.dim() != 4 or images.shape[1] != len(data.mean):
            raise ValueError(f"expected float (B, C, H, W), got shape {tuple(images.shape)}")
        return images.to(dtype or images.dtype).contiguous(memory_format=fmt)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 (B, H, W, C), got {images.dtype} {tuple(images.shape)}")
    scale, shift = _stats(tuple(data.mean), tuple(data.std), str(images.device))
    x = images.permute(0, 3, 1, 2).float()  # keeps the NHWC strides, i.e. channels_last
    x = torch.addcmul(shift, x, scale)       # one fused pass: x*scale + shift
    return x.to(dtype or torch.float32).contiguous(memory_format=fmt)


def batch_preparer(cfg, precision: str):
    """`prepare_batch` for a model at `precision`, with cfg.data and train.channels_last bound: images ->
    model input. Under autocast (bf16, fp16) a float16 batch is not upcast only to be cast back."""
    dtype = torch.float32 if precision == "fp32" else None
    return functools.partial(prepare_batch, data=cfg.data, channels_last=cfg.train.channels_last, dtype=dtype)


def derive_seed(seed: int, *parts) -> int:
    """A 31-bit seed for one random stream: the run's seed and labelled parts, e.g. ("shuffle", epoch).
    A hash, not arithmetic, so different (seed, parts) never share a stream by accident; 31 bits suit
    torch generators and DALI alike."""
    key = repr((int(seed),) + tuple(parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % (2**31 - 1)


# ---------------------------------------------------------------- the files a batch may hold
# What DALI's decoder refuses, every backend and the scan refuse by these rules: the same files everywhere.
# The leading bytes of the formats DALI reads: JPEG, PNG, BMP, TIFF, PNM, JPEG 2000 (WebP: format_problem).
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
PNM_MAGIC = (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
_MAGIC = (JPEG_MAGIC, PNG_MAGIC, b"BM", b"II*\x00", b"MM\x00*", *PNM_MAGIC, b"\x00\x00\x00\x0cjP  ",
          b"\xff\x4f\xff\x51")


def format_problem(head: bytes) -> str:
    """'' when `head` (a file's first 12 bytes) starts like a format DALI's decoder reads, else why not."""
    if not head:
        return "empty (0-byte) file"
    if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return ""
    if head.startswith(b"GIF8"):
        return "a GIF, which DALI's decoder (training's) cannot read: convert it to JPEG or PNG"
    return (f"not an image format training reads (JPEG, PNG, BMP, TIFF, PNM, JPEG 2000, WebP); it starts "
            f"with {head[:8]!r}")


def truncated(data: bytes) -> str:
    """Why a JPEG's or PNG's bytes stop before their end, else '': a JPEG with no end-of-image marker
    after its last start-of-scan, a PNG that ends before its IEND chunk does. DALI refuses both, but in a
    batch it can crash on the first and fails on the second without naming it, so the DALI feed refuses
    them first. Bytes after the end (camera trailers) pass."""
    if data.startswith(PNG_MAGIC):
        return _png_truncated(data)
    if not data.startswith(JPEG_MAGIC):
        return ""
    if data.endswith(b"\xff\xd9") and data.find(b"\xff\xda") >= 0:   # the usual case, found near the start
        return ""
    sos = data.rfind(b"\xff\xda")
    if sos < 0 or data.find(b"\xff\xd9", sos) < 0:
        return "a truncated JPEG (no end-of-image marker after its image data): copy it again or remove it"
    return ""


def _png_truncated(data: bytes) -> str:
    """`truncated` for a PNG: its chunks (length, type, body, CRC) walked up to IEND."""
    i = len(PNG_MAGIC)
    while i + 12 <= len(data):
        if data[i + 4:i + 8] == b"IEND":
            return ""
        i += 12 + int.from_bytes(data[i:i + 4], "big")
    return "a truncated PNG (it ends before its IEND chunk does): copy it again or remove it"


# JPEG frame header markers (SOF0-3, 5-7, 9-11, 13-15: baseline, progressive, lossless, ...); C4, C8 and
# CC in that range are other segments (DHT, JPG, DAC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def zero_size(data: bytes) -> str:
    """Why a JPEG's frame header (SOF) or a PNG's IHDR declares a 0 width or height, else '' (also for
    other formats, and headers this walk cannot follow: the decoder judges those). Alone in a batch, such
    a file makes DALI fail with "invalid parameter", as a bug (a wrong call) does, so the header names it
    (a 0 height with a DNL marker is valid JPEG, but no decoder here reads it)."""
    if data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR":
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    elif data.startswith(JPEG_MAGIC) and (sof := jpeg_frame(data)) >= 0:   # FF Cn, length, precision, h, w
        h, w = int.from_bytes(data[sof + 5:sof + 7], "big"), int.from_bytes(data[sof + 7:sof + 9], "big")
    else:
        return ""
    if w and h:
        return ""
    kind = "PNG" if data[:1] == b"\x89" else "JPEG"
    return (f"a {kind} whose header declares a {w}x{h} (width x height) image, which DALI cannot decode: "
            "re-encode it from its source or remove it")


def jpeg_frame(data: bytes) -> int:
    """Where a JPEG's frame header (FF Cn, length, precision, height, width, components) starts, by a
    walk over its marker segments; -1 when the image data (or the walk's end) comes first."""
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:   # marker segments: FF, marker, 2-byte length
        marker = data[i + 1]
        if marker in _SOF:
            return i
        if marker in (0xDA, 0xD9):                  # image data (or its end) before any frame header
            return -1
        if marker == 0xFF:                          # a fill byte
            i += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return -1


def webp_misread(data: bytes) -> str:
    """Why DALI's WebP parser misreads a well-formed WebP, else '': an EXIF chunk after a lossless image
    chunk (VP8L) of odd length, which RIFF pads by a byte. DALI fails on it with an internal error."""
    if data[:4] != b"RIFF" or data[8:16] != b"WEBPVP8X":
        return ""
    i, odd_image = 12, False
    while i + 8 <= len(data):
        kind, n = data[i:i + 4], int.from_bytes(data[i + 4:i + 8], "little")
        if kind == b"EXIF" and odd_image:
            return "a lossless WebP that DALI misreads (EXIF after an odd-length image): save it as PNG"
        odd_image |= kind == b"VP8L" and n % 2 == 1
        i += 8 + n + n % 2
    return ""


def by_rule(data: bytes) -> str:
    """Why `data` (a file's bytes) is refused before any decoder sees it, else '': no format DALI reads,
    a JPEG or PNG cut short, a 0 width or height (DALI cannot say which file), a WebP DALI misreads."""
    return format_problem(data[:12]) or truncated(data) or zero_size(data) or webp_misread(data)


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of shard `rank` of `n` items: DALI's formula (floor(n*r/W)), sizes differ by <= 1."""
    return n * rank // world_size, n * (rank + 1) // world_size


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """One loader's job, fixed when it is built."""

    data: object                 # the frozen DataConfig (recipe, sizes, rotations) and
    loader: object               # LoaderConfig (threads, prefetch, DALI knobs)
    mode: str                    # "all" | "one_random" (rotation loaders) | "class" (class loaders)
    rotations: tuple[int, ...]   # degrees (data.rotations, checked by rotnet.config)
    batch_size: int              # originals per step (N)
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    train: bool                  # training recipe, shuffled and sharded; else eval recipe, in order
    seed: int
    normalize: bool              # emit normalised float16 (normalize_in_graph)
    split_dir: str
    paths: object                # every file of the split, all ranks' (a pipelines.listing.PathTable);
    labels: tuple[int, ...]      # with tar shards, paths name the members ("DIR/shard-000000.tar:KEY.jpg")
    classes: tuple[str, ...]     # the class names, which labels index
    shards: object = None        # data.format "shards": the pipelines.listing.ShardSet holding the bytes

    @property
    def k(self) -> int:
        return len(self.rotations)

    @property
    def pipe_batch(self) -> int:
        """Samples drawn per step: N, or K*N originals in one_random (one rotation each)."""
        return self.batch_size * self.k if self.mode == "one_random" else self.batch_size

    def seed_for(self, *parts) -> int:
        return derive_seed(self.seed, *parts)


def rank_indices(n: int, batch: int, rank: int, world: int, train: bool, seed: int, epoch: int) -> list[int]:
    """Indices of the n samples that rank `rank` reads in `epoch`, in order, for loaders that pick
    their own samples (torch backend, resident images, tar shards in DALI).

    Training (as DistributedSampler): a permutation of all n seeded by (seed, epoch), the tail
    dropped so every rank gets floor(n / W), rank r takes every W-th, full batches only (equal
    step counts). Validation: rank r's contiguous shard (DALI's split), all of it.
    """
    if train:
        g = torch.Generator().manual_seed(derive_seed(seed, "shuffle", epoch))
        per_rank = n // world
        perm = torch.randperm(n, generator=g)[: per_rank * world]
        idx = perm[rank::world].tolist()
        return idx[: (len(idx) // batch) * batch]
    return list(range(*shard_range(n, rank, world)))


def rotation_labels(k: int, n: int, device=None) -> torch.Tensor:
    """int64 (K*N,) labels of a sample-major batch: [0, 1, .., K-1] repeated N times."""
    return torch.arange(k, device=device, dtype=torch.int64).repeat(n)


def assemble(spec: LoaderSpec, x: torch.Tensor, y=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A backend's batch -> the contract's (images, labels) on spec.device.

    x  mode "all": uint8 (N, K, H, W, C), the K rotations of each crop; else (P, H, W, C).
       Or float16 of those shapes when the DALI graph normalised.
    y  int (P,): rotation index (one_random) or class label (class); ignored in mode "all".
    Returns images (K*N | P, H, W, C) uint8, or normalised float16 (B, C, H, W) in channels-last
    memory when spec.normalize; labels int64 (B,).
    """
    dev = spec.device
    x = x.to(dev, non_blocking=True)
    if spec.mode == "all":
        n = x.shape[0]
        x = x.reshape((n * spec.k,) + tuple(x.shape[2:]))  # sample-major: row K*i + r (a view)
        y = rotation_labels(spec.k, n, device=dev)
    else:
        y = torch.as_tensor(y).reshape(-1).to(dev, torch.int64, non_blocking=True)
    if spec.normalize:  # float16 (B, C, H, W) on NHWC memory: the model's channels_last, no copy
        x = (x.permute(0, 3, 1, 2) if x.is_floating_point()
             else prepare_batch(x, spec.data, channels_last=True, dtype=torch.float16))
    return x, y


class LoaderBase:
    """Base of both backends' loaders (DaliLoader, TorchLoader subclass it directly): steps, epochs and
    the resume state, the object side of the contract, written once. A backend implements `_batches()`:
    the raw batches of epoch `self.epoch` from step `self.step` on, each for `assemble`. DALI also ends its
    reader epoch in `_end_epoch` and extends `state_dict` / `load_state_dict` with its pipeline's state."""

    backend = ""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.classes = list(spec.classes)
        n, w, p = len(spec.paths), spec.world_size, spec.pipe_batch
        self.num_samples = n                 # originals per epoch, all ranks
        lo, hi = shard_range(n, spec.rank, w)
        self._shard = (lo, hi)               # validation: this rank's files, read once each
        # training: floor(M / W) files per rank, full batches only, so all ranks take equal steps
        self._steps = (n // w) // p if spec.train else math.ceil((hi - lo) / p)
        if spec.train and self._steps == 0:
            raise InputError(f"{spec.split_dir}: {n // w} images per rank < one batch of {p}: lower the "
                             "batch size or use more data")
        self.epoch = 0                       # epoch the current/next iteration belongs to
        self.step = 0                        # batches of that epoch already run

    def __len__(self) -> int:
        return self._steps

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (no-op when it is the current one, e.g. resumed mid-epoch)."""
        if epoch != self.epoch:
            self._end_epoch()
            self.epoch, self.step = epoch, 0

    def __iter__(self):
        if self.step >= self._steps:         # the previous epoch finished without set_epoch
            self.set_epoch(self.epoch + 1)
        for x, y in self._batches():
            self.step += 1
            yield assemble(self.spec, x, y)
        self._end_epoch()

    def state_dict(self) -> dict:
        return {**self._identity(), "seed": self.spec.seed, "epoch": self.epoch, "batch": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was saved; refuses a state of another backend or run shape."""
        if state.get("backend") != self.backend:
            raise InputError(f"loader state is from backend {state.get('backend')!r}, not {self.backend!r}: "
                             f"resume with loader.backend={state.get('backend')}")
        state = {"format": "folder", **state}    # states saved before tar shards existed read folders
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise InputError(f"loader state {key}={state.get(key)!r} does not match this run ({value!r})")
        self.epoch, self.step = int(state["epoch"]), int(state["batch"])

    def _identity(self) -> dict:
        s = self.spec
        return {"backend": self.backend, "format": s.data.format, "mode": s.mode, "world_size": s.world_size,
                "num_samples": self.num_samples}

    def _batches(self):
        raise NotImplementedError

    def _end_epoch(self) -> None:
        """Called when an epoch is left (loop done, or set_epoch)."""
