"""The torch loader: the reference recipe (pipelines/recipe.py) on torchvision-decoded images, every
epoch in DataLoader workers, or, with loader.resident=True, on a split decoded once and kept on `device`.

Resident images are for small images (CIFAR), where re-decoding costs more than the model step; eval
crops are precomputed. Either way the steps come from one `EpochSampler`, and randomness is a function
of (seed, epoch, step, rank), never of worker state, so a resumed run replays the same batches;
sharding is pipelines.batch.rank_indices.
"""
from __future__ import annotations

import ctypes
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from pipelines.batch import LoaderBase, LoaderSpec, rank_indices
from pipelines.recipe import crop_batch, decode_rgb, make_batch, pinned_copy
from rotnet.cli import InputError


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
        try:
            images = [decode_sample(self.spec, i) for i in idx]
        except InputError as e:   # a bad file: returned whole, so that the trainer raises it as one line
            return e              # (a worker's raise reaches it as a traceback inside the message)
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


class TorchLoader(LoaderBase):
    """Files decoded every epoch in DataLoader workers (loader.num_threads of them), or, resident, once.
    Resident images: one uint8 (M, H, W, C) tensor on `device` when sizes agree, else a list."""

    backend = "torch"

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        s = spec
        self.sampler = EpochSampler(len(s.paths), s.pipe_batch, s.rank, s.world_size, s.train, s.seed)
        if spec.loader.resident:
            self._load_resident()
            return
        workers = spec.loader.num_threads
        self._loader = torch.utils.data.DataLoader(
            StepDataset(spec), batch_size=None, sampler=self.sampler, num_workers=workers,
            prefetch_factor=max(1, spec.loader.prefetch) if workers else None,
            persistent_workers=workers > 0, pin_memory=spec.device.type == "cuda",
            worker_init_fn=fix_mmap_threshold if workers else None)

    def _batches(self):
        self.sampler.epoch, self.sampler.start = self.epoch, self.step  # the steps left to run
        return self._resident_batches() if self.spec.loader.resident else self._decoded_batches()

    def _decoded_batches(self):
        for batch in self._loader:
            if isinstance(batch, InputError):
                # Stop the workers now: collected later (the error's traceback keeps the iterator),
                # each one waits out DataLoader's 5 s join timeout.
                workers = getattr(self._loader, "_iterator", None)
                if workers is not None:
                    workers._shutdown_workers()
                    self._loader._iterator = None
                raise batch
            yield batch

    # ------------------------------------------------------------ loader.resident
    def _load_resident(self) -> None:
        spec, data, dev = self.spec, self.spec.data, self.spec.device

        def load(i):  # uint8 (H, W, C); eval crops now
            img = decode_sample(spec, i)
            return img if spec.train else crop_batch([img], data, False)[0]

        with ThreadPoolExecutor(max(1, spec.loader.num_threads)) as ex:  # decode ops release the GIL
            imgs = list(ex.map(load, range(len(spec.paths))))
        self.labels = torch.tensor(spec.labels, dtype=torch.int64, device=dev)
        if all(im.shape == imgs[0].shape for im in imgs):
            self.images = torch.stack(imgs).to(dev)  # (M, H, W, C)
        else:
            self.images = [im.to(dev) for im in imgs]
        # CPU: build batches one ahead in a helper thread with ONE intra-op thread (small ops:
        # OpenMP teams on busy cores are far slower); per thread, so the trainer's are untouched.
        self._helper = None if dev.type == "cuda" else ThreadPoolExecutor(
            1, initializer=torch.set_num_threads, initargs=(1,))

    def _make(self, item):
        key, idx = item
        i = pinned_copy(torch.tensor(idx, dtype=torch.int64), self.spec.device)
        images = self.images[i] if torch.is_tensor(self.images) else [self.images[j] for j in idx]
        return make_batch(self.spec, key, images, self.labels[i], cropped=not self.spec.train)

    def _resident_batches(self):
        if self._helper is None:
            yield from map(self._make, self.sampler)
            return
        ahead = []   # the batch being yielded and the next one, in the works
        for item in self.sampler:
            ahead.append(self._helper.submit(self._make, item))
            if len(ahead) == 2:
                yield ahead.pop(0).result()
        for f in ahead:
            yield f.result()
