"""Pure-torch backend: torchvision decode + the torch recipe (pipelines.recipe) in DataLoader workers.

Randomness is a function of (seed, epoch, step, rank), never of worker state, so a resumed run
replays the same batches; sharding is pipelines.contract.rank_indices.
"""
from __future__ import annotations

import ctypes
import math

import torch

from pipelines.contract import Loader, LoaderSpec, rank_indices
from pipelines.recipe import decode_rgb, make_batch


class EpochSampler(torch.utils.data.Sampler):
    """Yields ((epoch, step), file indices) per step of this rank's part of `epoch`, from `start`."""

    def __init__(self, n: int, batch: int, rank: int, world: int, train: bool, seed: int):
        self.n, self.batch, self.rank, self.world, self.train, self.seed = n, batch, rank, world, train, seed
        self.epoch, self.start = 0, 0

    def indices(self) -> list[int]:
        """This rank's file indices for the current epoch."""
        return rank_indices(self.n, self.batch, self.rank, self.world, self.train, self.seed, self.epoch)

    def __iter__(self):
        idx, b = self.indices(), self.batch
        for step in range(self.start, math.ceil(len(idx) / b)):
            yield (self.epoch, step), idx[step * b:(step + 1) * b]


class SampledLoader(Loader):
    """Loader whose steps come from an EpochSampler; a subclass's `_run()` makes their batches."""

    backend = "torch"

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        s = spec
        self.sampler = EpochSampler(len(s.paths), s.pipe_batch, s.rank, s.world_size, s.train, s.seed)

    def _batches(self):
        self.sampler.epoch, self.sampler.start = self.epoch, self.step  # the steps left to run
        return self._run()


def decode_sample(spec: LoaderSpec, i: int) -> torch.Tensor:
    """Sample i of the split -> uint8 (H, W, C) RGB, from its file or its tar shard member."""
    data = spec.shards.read(i) if spec.shards is not None else None
    return decode_rgb(spec.paths[i], data).permute(1, 2, 0)


class StepDataset(torch.utils.data.Dataset):
    """Item = one whole step (an EpochSampler item): decoded, cropped and rotated in a worker."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec

    def __getitem__(self, item):
        key, idx = item
        images = [decode_sample(self.spec, i) for i in idx]
        return make_batch(self.spec, key, images, torch.tensor([self.spec.labels[i] for i in idx]))


M_MMAP_THRESHOLD = -3   # glibc's mallopt parameter number (malloc.h)


def fix_mmap_threshold(_worker_id: int = 0) -> None:
    """DataLoader worker start: pin glibc's mmap threshold at its 128 KiB default. Left dynamic,
    glibc raises it after each large block freed, so decoded images (~0.5 MB at ImageNet size)
    then come from the heap, which fragments: a worker grew ~4 MB per step without end
    (docs/pipelines.md, ImageNet scale). Not glibc: nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


class TorchLoader(SampledLoader):
    """Files decoded every epoch in DataLoader workers (loader.num_threads of them)."""

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        workers = spec.loader.num_threads
        self._loader = torch.utils.data.DataLoader(
            StepDataset(spec), batch_size=None, sampler=self.sampler, num_workers=workers,
            prefetch_factor=max(1, spec.loader.prefetch) if workers else None,
            persistent_workers=workers > 0, pin_memory=spec.device.type == "cuda",
            worker_init_fn=fix_mmap_threshold if workers else None)

    def _run(self):
        return iter(self._loader)
