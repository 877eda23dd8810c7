"""Input pipelines for RotNet pretraining and probes: DALI or pure-torch backends.

    loader = build_rotation_loader(cfg.data, split_dir, batch_size=N, rank=.., world_size=..,
                                   local_rank=.., device=dev, train=True, seed=cfg.train.seed)
    for images, labels in loader:                 # see the contract below
        x = prepare_batch(images, cfg.data, channels_last=True)

Contract (every backend, every loader):
  images  uint8 (B, H, W, C) on `device` -- normalise in the trainer with `prepare_batch`;
          or float16 (B, C, H, W) already normalised, when the loader normalises itself
          (device cuda and data.normalize "auto"/"graph", or "graph" anywhere).
  labels  int64 (B,) on `device`.
  rotation loader, mode "all": B = K*N (K = len(data.rotations), N = batch_size), sample-major:
          row K*i + r is original i rotated by data.rotations[r], label r.
          mode "one_random": K*N originals per step, one random rotation each, label = index.
  class loader: B = N original crops with class labels.
  len(loader) steps per epoch on this rank (equal on all ranks when train=True);
  .num_samples, .classes, .set_epoch(e), .state_dict(), .load_state_dict(s), .backend.
Details (ordering, sharding, validation coverage, bad files): docs/pipelines.md.
"""
from __future__ import annotations

import torch

from pipelines.listing import (BadImageError, list_images, resolve_file_list, shard_range,
                               subset_per_class)
from pipelines.normalize import normalize_in_graph, prepare_batch
from pipelines.rotations import check_rotations

__all__ = ["build_rotation_loader", "build_class_loader", "prepare_batch", "list_images",
           "BadImageError", "resolve_backend"]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str) -> str:
    """'auto' -> 'dali' when nvidia.dali imports, else 'torch'; 'dali' without DALI -> error."""
    if name not in ("auto", "dali", "torch"):
        raise ValueError(f"data.backend={name!r}; expected auto, dali or torch")
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise RuntimeError("data.backend='dali' but nvidia.dali cannot be imported: install "
                           "nvidia-dali-cuda120 (or -cuda130), or set data.backend=torch")
    return name


def _seed_for(seed: int, salt: int) -> int:
    return (int(seed) * 1_000_003 + salt * 7_919 + 12_345) % (2**31 - 1)


def _build(data, split_dir, *, kind, batch_size, rank, world_size, local_rank, device, train, seed,
           labels_per_class=0):
    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}")
    if data.crop_size < 1:
        raise ValueError(f"data.crop_size={data.crop_size}")
    rotations = check_rotations(data.rotations, data.rotation_mode)
    k = len(rotations)
    mode = data.rotation_mode if kind == "rotation" else "none"
    pipe_batch = batch_size * k if mode == "one_random" else batch_size
    file_list = resolve_file_list(data.file_list, split_dir, data.train_dir)
    paths, labels, classes = list_images(split_dir, file_list)
    if labels_per_class > 0:
        keep = subset_per_class(labels, labels_per_class, seed)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    normalize = normalize_in_graph(data.normalize, device)
    common = dict(kind=kind, mode=mode, k=k, batch_size=batch_size, pipe_batch=pipe_batch,
                  train=train, device=device, classes=classes, num_samples=len(paths), seed=seed)
    if getattr(data, "resident", False):
        from pipelines.resident import ResidentLoader

        return ResidentLoader(paths=paths, labels=labels, data=data, rank=rank, world=world_size,
                              rotations=rotations, normalize=normalize, **common)
    backend = resolve_backend(data.backend)
    if backend == "torch":
        from pipelines.torch_backend import RotationDataset, TorchLoader

        ds = RotationDataset(paths, labels, data, train, kind, rotations, mode)
        common.pop("train")
        return TorchLoader(dataset=ds, rank=rank, world=world_size, train=train,
                           num_workers=data.num_threads, prefetch=data.prefetch,
                           normalize=normalize, data=data, **common)
    return _build_dali(data, split_dir, paths, labels, rotations, normalize, rank, world_size,
                       local_rank, common)


def _build_dali(data, split_dir, paths, labels, rotations, normalize, rank, world_size, local_rank, common):
    import os

    from pipelines.dali_graph import rotation_graph
    from pipelines.dali_loader import DaliLoader

    device = common["device"]
    gpu = device.type == "cuda"
    # CPU: the graph stops after decode + crop and torch finishes the batch (faster on CPU,
    # see pipelines/host_post.py); GPU: everything in the graph. data.dali_rotate_in_graph
    # forces the full graph on CPU too.
    full = gpu or data.dali_rotate_in_graph
    root = os.path.abspath(split_dir)
    rel = [os.path.relpath(p, root) for p in paths]  # shorter strings in the serialised graph
    mixed_args = dict(hw_decoder_load=data.hw_decoder_load, device_memory_padding=data.device_memory_padding,
                      host_memory_padding=data.host_memory_padding) if gpu else {}
    seed = common["seed"]
    graph_args = dict(
        files=rel, labels=list(labels), file_root=root, shard_id=rank, num_shards=world_size,
        train=common["train"], reader_seed=_seed_for(seed, 1),  # same on all ranks: one global shuffle
        recipe=data.recipe, crop=data.crop_size, resize=data.resize_size, min_scale=data.min_scale,
        rotations=rotations, mode=common["mode"], decoder_device="mixed" if gpu else "cpu",
        mixed_args=mixed_args, normalize=normalize and full, mean=list(data.mean), std=list(data.std),
        stage="full" if full else "host")

    def make_pipe(checkpoint):
        pipe = rotation_graph(
            **graph_args, batch_size=common["pipe_batch"], num_threads=max(1, data.num_threads),
            device_id=(device.index if device.index is not None else local_rank) if gpu else None,
            seed=_seed_for(seed, 1000 + rank),  # augmentation randomness: per global rank
            prefetch_queue_depth=max(1, data.prefetch), checkpoint=checkpoint)
        pipe.build()
        return pipe

    n = len(paths)
    shard_sizes = [shard_range(n, r, world_size)[1] - shard_range(n, r, world_size)[0] for r in range(world_size)]
    lo, hi = shard_range(n, rank, world_size)
    # Files this rank may read (to name a bad one DALI does not name): training reshuffles
    # globally every epoch, so any file.
    mine = paths if common["train"] else paths[lo:hi]
    finisher = normalize_host = None
    if not full:
        from pipelines.host_post import HostFinisher

        finisher = HostFinisher(data.crop_size, rotations, common["mode"], threads=data.num_threads)
        if normalize:  # data.normalize == "graph" on CPU: same float16 CHW output contract
            normalize_host = lambda x: prepare_batch(x, data, channels_last=False).half()  # noqa: E731
    return DaliLoader(make_pipe=make_pipe, shard_sizes=shard_sizes, rank=rank, paths=mine,
                      finisher=finisher, normalize_host=normalize_host, **common)


def build_rotation_loader(data, split_dir: str, *, batch_size: int, rank: int, world_size: int,
                          local_rank: int, device: torch.device, train: bool, seed: int):
    """Rotation-prediction batches: (K*N images, rotation labels); see the module docstring."""
    return _build(data, split_dir, kind="rotation", batch_size=batch_size, rank=rank,
                  world_size=world_size, local_rank=local_rank, device=device, train=train, seed=seed)


def build_class_loader(data, split_dir: str, *, batch_size: int, rank: int, world_size: int,
                       local_rank: int, device: torch.device, train: bool, seed: int,
                       labels_per_class: int = 0):
    """Class-labelled batches of N crops (probes). labels_per_class=K>0: seeded K-per-class subset."""
    return _build(data, split_dir, kind="class", batch_size=batch_size, rank=rank, world_size=world_size,
                  local_rank=local_rank, device=device, train=train, seed=seed,
                  labels_per_class=labels_per_class)
