"""What every loader is given (`LoaderSpec`) and what it yields (`assemble`); seeds; state.

`pipelines.build_*_loader` builds one frozen LoaderSpec and hands it whole to the backend.
Each backend ends every batch with `assemble`, so the batch contract of pipelines/__init__.py
is written once, and derives every random stream with `derive_seed`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

from pipelines.listing import PathTable, shard_range
from pipelines.normalize import prepare_batch
from pipelines.rotations import rotation_labels
from rotnet.cli import InputError

RECIPES = ("imagenet", "cifar")   # pipelines/recipe.py in torch ops, pipelines/dali_graph.py in DALI


def check_recipe(data) -> None:
    if data.recipe not in RECIPES:
        raise InputError(f"data.recipe={data.recipe!r}; expected one of {RECIPES}")


def derive_seed(seed: int, *parts) -> int:
    """A 31-bit seed for one random stream: the run's seed and labelled parts, e.g. ("shuffle", epoch).

    A hash, not arithmetic, so different (seed, parts) never share a stream by accident; 31 bits
    suit torch generators and DALI alike.
    """
    key = repr((int(seed),) + tuple(parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % (2**31 - 1)


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """One loader's job, fixed when it is built."""

    data: object                 # the frozen DataConfig (recipe, sizes, rotations) and
    loader: object               # LoaderConfig (threads, prefetch, DALI knobs)
    mode: str                    # "all" | "one_random" (rotation loaders) | "class" (class loaders)
    rotations: tuple[int, ...]   # degrees, validated (pipelines.rotations.check_rotations)
    batch_size: int              # originals per step (N)
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    train: bool                  # training recipe, shuffled and sharded; else eval recipe, in order
    seed: int
    normalize: bool              # emit normalised float16 (pipelines.normalize.normalize_in_graph)
    split_dir: str
    paths: PathTable             # every file of the split (all ranks), its label, the class names;
    labels: tuple[int, ...]      # with tar shards, paths name the members ("DIR/shard-000000.tar:KEY.jpg")
    classes: tuple[str, ...]
    shards: object = None        # data.format "shards": the pipelines.shard_reader.ShardSet holding the bytes

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


class Loader:
    """Base of every backend's loader: steps, epochs and state, the object side of the contract.

    A backend implements `_batches()`: the raw batches of epoch `self.epoch` from step
    `self.step` on, each for `assemble`. DALI also overrides the hooks at the end.
    """

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
        return {**self._identity(), "seed": self.spec.seed, "epoch": self.epoch, "batch": self.step,
                **self._extra_state()}

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
        self._restore(state)

    def _identity(self) -> dict:
        s = self.spec
        return {"backend": self.backend, "format": s.data.format, "mode": s.mode, "world_size": s.world_size,
                "num_samples": self.num_samples}

    def _batches(self):
        raise NotImplementedError

    def _end_epoch(self) -> None:
        """Called when an epoch is left (loop done, or set_epoch)."""

    def _extra_state(self) -> dict:
        return {}

    def _restore(self, state: dict) -> None:
        """Called by load_state_dict after epoch and step are set."""


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
