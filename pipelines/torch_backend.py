"""Pure-torch backend: torchvision decode + uint8 tensor ops in DataLoader workers.

Same outputs and interface as the DALI loader. Every sample is decoded to RGB uint8
(ImageReadMode.RGB: greyscale, CMYK and PNG-named-.JPEG files included) and stays uint8
until the trainer's `prepare_batch` (or a device-side normalise when data.normalize says
graph). Randomness is a function of (seed, epoch, position in the epoch), never of worker
state, so a resumed run (`load_state_dict`) replays exactly the same crops.

Sharding (like DistributedSampler): training permutes all M files with (seed, epoch), drops
the tail so every rank gets floor(M / W), rank r takes every W-th, and only full batches are
used (equal step counts). Validation: rank r reads its contiguous shard (DALI's split),
all of it, the last batch smaller -- every image exactly once.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image, read_file

from pipelines.listing import BadImageError, shard_range
from pipelines.normalize import prepare_batch
from pipelines.rotations import rotate_hwc, rotation_labels, stack_rotations


def decode_rgb(path: str) -> torch.Tensor:
    """File -> uint8 (3, H, W) RGB; a BadImageError naming the file when it cannot be decoded."""
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except Exception as e:  # torchvision raises RuntimeError / ValueError for bad data
        raise BadImageError(f"bad image file {path!r}: {e}. Run `python -m pipelines.scan SPLIT_DIR "
                            "--out LIST` and set data.file_list to the list it writes.") from e


def rrc_params(h: int, w: int, min_scale: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop window (top, left, height, width), area in [min_scale, 1], ratio [3/4, 4/3]."""
    area = h * w
    log_r = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        u = torch.rand(3, generator=g).tolist()
        target = area * (min_scale + (1.0 - min_scale) * u[0])
        ratio = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    side = min(h, w)  # fallback: centre square (as torchvision does for extreme ratios)
    return (h - side) // 2, (w - side) // 2, side, side


def apply_recipe(img: torch.Tensor, data, train: bool, g: torch.Generator) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, crop, crop) per data.recipe, flip included (train)."""
    crop = data.crop_size
    if data.recipe == "imagenet":
        if train:
            top, left, ch, cw = rrc_params(img.shape[-2], img.shape[-1], data.min_scale, g)
            img = TF.resized_crop(img, top, left, ch, cw, [crop, crop], antialias=True)
        else:
            img = TF.center_crop(TF.resize(img, [data.resize_size], antialias=True), [crop, crop])
    elif data.recipe == "cifar":
        if train:
            img = TF.center_crop(img, [crop + 8, crop + 8])  # zero pad 4 on each side
            dy, dx = torch.randint(0, 9, (2,), generator=g).tolist()
            img = img[:, dy:dy + crop, dx:dx + crop]
        else:
            img = TF.center_crop(img, [crop, crop])
    else:
        raise ValueError(f"data.recipe={data.recipe!r}; expected 'imagenet' or 'cifar'")
    if train and bool(torch.rand(1, generator=g) < 0.5):
        img = TF.horizontal_flip(img)
    return img


class RotationDataset(torch.utils.data.Dataset):
    """Indexed by (file index, sample seed) tuples from `EpochSampler`.

    kind/mode -> item: rotation "all": (uint8 (K, H, W, C), 0); rotation "one_random":
    (uint8 (H, W, C), rotation index); class: (uint8 (H, W, C), class label).
    """

    def __init__(self, paths, labels, data, train: bool, kind: str, rotations: list[int], mode: str):
        self.paths, self.labels, self.data, self.train = paths, labels, data, train
        self.kind, self.rotations, self.mode = kind, rotations, mode

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, sample_seed = item
        g = torch.Generator().manual_seed(sample_seed)
        img = apply_recipe(decode_rgb(self.paths[index]), self.data, self.train, g)
        hwc = img.permute(1, 2, 0)
        if self.kind == "class":
            return hwc.contiguous(), self.labels[index]
        if self.mode == "all":
            return stack_rotations(hwc, self.rotations), 0
        r = int(torch.randint(0, len(self.rotations), (1,), generator=g))
        return rotate_hwc(hwc, self.rotations[r]).contiguous(), r


class EpochSampler(torch.utils.data.Sampler):
    """Yields (file index, sample seed) for this rank's part of the current epoch, from `start`."""

    def __init__(self, n: int, batch: int, rank: int, world: int, train: bool, seed: int):
        self.n, self.batch, self.rank, self.world, self.train, self.seed = n, batch, rank, world, train, seed
        self.epoch, self.start = 0, 0
        self._cache: tuple[int, list[int]] | None = None

    def indices(self) -> list[int]:
        """This rank's file indices for the current epoch (cached: len() asks often)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._indices())
        return self._cache[1]

    def _indices(self) -> list[int]:
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            per_rank = self.n // self.world
            perm = torch.randperm(self.n, generator=g)[: per_rank * self.world]
            idx = perm[self.rank::self.world].tolist()
            return idx[: (len(idx) // self.batch) * self.batch]  # full batches only
        lo, hi = shard_range(self.n, self.rank, self.world)
        return list(range(lo, hi))

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + self.rank * 1_000_000_007
        for pos, i in enumerate(self.indices()[self.start:], start=self.start):
            yield i, (base + pos) % (2**63 - 1)

    def __len__(self):
        return len(self.indices()) - self.start


class EpochLoader:
    """Step/epoch bookkeeping shared by the torch-op loaders (TorchLoader, ResidentLoader) over
    an EpochSampler. Subclasses set: sampler, _step (steps of the current epoch already
    yielded), _p (batch per pipeline step), _seed, _world, kind, num_samples; `_state_tag`
    adds keys to state_dict right after 'backend'."""

    backend = "torch"
    _state_tag: dict = {}

    def __len__(self):
        return math.ceil(len(self.sampler.indices()) / self._p)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.sampler.epoch:
            self.sampler.epoch, self._step = epoch, 0

    def state_dict(self) -> dict:
        return {"backend": "torch", **self._state_tag, "kind": self.kind, "epoch": self.sampler.epoch,
                "batch": self._step, "seed": self._seed, "world_size": self._world,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("backend") != "torch":
            raise ValueError(f"loader state is from backend {state.get('backend')!r}, not 'torch'")
        for key, value in {"world_size": self._world, "num_samples": self.num_samples, "kind": self.kind}.items():
            if state.get(key) != value:
                raise ValueError(f"loader state {key}={state.get(key)!r} does not match this run ({value!r})")
        self.sampler.epoch, self._step = int(state["epoch"]), int(state["batch"])

    def _roll_epoch(self) -> None:
        """At iter(): if the previous epoch finished without set_epoch, start the next one."""
        if self._step >= len(self):
            self.sampler.epoch, self._step = self.sampler.epoch + 1, 0


class TorchLoader(EpochLoader):
    """DataLoader-based loader with the same contract as DaliLoader."""

    def __init__(self, *, dataset, kind, mode, k, batch_size, pipe_batch, rank, world, train,
                 device, classes, num_samples, seed, num_workers, prefetch, normalize, data):
        self.kind, self.mode, self.k, self.batch_size = kind, mode, k, batch_size
        self.device, self.classes, self.num_samples = torch.device(device), classes, num_samples
        self._p, self._world, self._seed, self._normalize, self._data = pipe_batch, world, seed, normalize, data
        self.sampler = EpochSampler(len(dataset), pipe_batch, rank, world, train, seed)
        if train and len(self.sampler.indices()) == 0:
            raise ValueError(f"{len(dataset) // world} images per rank < one batch of {pipe_batch}")
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=pipe_batch, sampler=self.sampler, num_workers=num_workers,
            prefetch_factor=max(1, prefetch) if num_workers else None, drop_last=False,
            persistent_workers=num_workers > 0, pin_memory=self.device.type == "cuda")
        self._step = 0          # steps of the current epoch already yielded

    def __iter__(self):
        self._roll_epoch()
        self.sampler.start = self._step * self._p
        for images, labels in self._loader:
            self._step += 1
            yield self._convert(images, labels)

    def _convert(self, images, labels):
        n = images.shape[0]
        x = images.to(self.device, non_blocking=True)
        if self.kind == "rotation" and self.mode == "all":
            x = x.reshape((n * self.k,) + tuple(x.shape[2:]))  # (N, K, H, W, C) -> (K*N, H, W, C)
            y = rotation_labels(self.k, n, device=self.device)
        else:
            y = torch.as_tensor(labels, dtype=torch.int64).to(self.device, non_blocking=True)
        if self._normalize:
            x = prepare_batch(x, self._data, channels_last=False).half()
        return x, y
