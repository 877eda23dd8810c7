"""The rows of benchmarks/storage.py: rotnet's loaders and their peers, each a generator of the samples
(reader-only) or original images (full pipeline) of every step it takes, forever.

    steps = rotnet_steps(args, split_dir, "shards", "reader", info)   # info["in_flight"] set
"""
from __future__ import annotations

import functools
import itertools
import os

from nvidia.dali import pipeline_def

ROTATIONS = (0, 90, 180, 270)


# Each yields the samples of every step it takes, forever (epoch after epoch), and puts in
# info["in_flight"] how many reads it keeps outstanding.
def rotnet_steps(args, split_dir: str, fmt: str, mode: str, info: dict):
    from pipelines import build_rotation_loader
    from rotnet.config import load_config

    cfg = load_config(None, ["loader.backend=dali", "data.recipe=imagenet", f"data.format={fmt}",
                             f"data.crop_size={args.crop}", f"loader.num_threads={args.threads}",
                             f"loader.prefetch={args.prefetch}",
                             f"loader.reads_in_flight={args.reads_in_flight}"])
    loader = build_rotation_loader(cfg, split_dir, batch_size=args.batch, train=True, seed=0)
    info["in_flight"] = cfg.loader.reads_in_flight
    if mode == "reader":   # one feed over the epochs, as the full pipeline's
        for batch in loader.read_only_batches(itertools.count()):
            yield len(batch)
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for images, _ in loader:
            yield images.shape[0] // len(ROTATIONS)


@pipeline_def
def read_only_graph(reader):
    """The encoded samples of `reader`, nothing else."""
    jpegs, _ = reader()
    return jpegs


def dali_steps(args, reader, mode: str, info: dict):
    """A DALI pipeline of `reader` (reader(labels=...) -> (encoded, label)): the reader alone, or the
    same decode + RRC in DALI and flip + rotations in the OpenCV finisher as rotnet's CPU loader, so
    that the rows differ in their readers only."""
    import numpy as np
    import torch

    from pipelines.dali_graph import CpuFinisher, rotation_graph

    info["in_flight"] = 1
    common = dict(batch_size=args.batch, num_threads=args.threads, device_id=None, seed=0,
                  prefetch_queue_depth=args.prefetch)
    if mode == "reader":
        pipe = read_only_graph(reader=reader, **common)
    else:
        pipe = rotation_graph(reader=reader, train=True, recipe="imagenet", crop=args.crop, resize=args.crop,
                              min_scale=0.08, rotations=list(ROTATIONS), mode="all", decoder_device="cpu",
                              mixed_args={}, normalize=False, mean=[0.0] * 3, std=[1.0] * 3, stage="host",
                              **common)
        finish = CpuFinisher(args.crop, list(ROTATIONS), "all", threads=args.threads)
    pipe.build()
    while True:
        outs = pipe.run()
        if mode == "reader":
            yield len(outs[0])
            continue
        crops, _, flips, _ = outs
        views = [torch.from_numpy(np.asarray(crops[i])) for i in range(len(crops))]
        # (N, K, S, S, C): N originals, each in its K rotations
        yield finish(views, np.asarray(flips.as_tensor()).reshape(-1).tolist(), [0] * len(views)).shape[0]


# reader(labels=...) as rotation_graph calls it: labels=False drops the label output.
def dali_file_reader(folder: str, labels: bool = True):
    import nvidia.dali.fn as fn

    jpegs, label = fn.readers.file(file_root=folder, random_shuffle=True, seed=0, dont_use_mmap=True,
                                   name="Reader")
    return jpegs, label if labels else None


def dali_wds_reader(shards: str, labels: bool = True):
    import nvidia.dali.fn as fn

    tars = sorted(os.path.join(shards, n) for n in os.listdir(shards) if n.endswith(".tar"))
    jpegs, label = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                         ext=["jpg", "cls"], random_shuffle=True, seed=0, dont_use_mmap=True,
                                         name="Reader")
    return jpegs, label if labels else None


def _rotated_crops(sample, crop: int):
    """(PIL image,) -> (uint8 (4, 3, crop, crop),): RRC + flip, then the 4 rotations (torch.rot90)."""
    import torch
    import torchvision.transforms as T

    x = T.PILToTensor()(T.RandomHorizontalFlip()(T.RandomResizedCrop(crop)(sample[0])))
    return (torch.stack([torch.rot90(x, k, dims=(1, 2)) for k in range(len(ROTATIONS))]),)


def wds_steps(args, shards: str, mode: str, info: dict):
    """The webdataset package: each DataLoader worker streams whole tars (its share of them)."""
    import torch
    import webdataset as wds

    info["in_flight"] = args.workers
    tars = sorted(os.path.join(shards, n) for n in os.listdir(shards) if n.endswith(".tar"))
    # epoch after epoch, shards reshuffled; the sample buffer is full before the first sample leaves it
    ds = wds.WebDataset(tars, shardshuffle=len(tars), empty_check=False, seed=0).repeat()
    ds = ds.shuffle(1000, initial=1000)
    if mode == "reader":   # lists of (bytes,) to the main process
        ds = ds.to_tuple("jpg").batched(args.batch, collation_fn=None)
    else:                  # [uint8 (B, 4, 3, crop, crop)]
        ds = ds.decode("pil").to_tuple("jpg").map(functools.partial(_rotated_crops, crop=args.crop))
        ds = ds.batched(args.batch)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers,
                                         prefetch_factor=args.prefetch)
    for batch in loader:
        yield len(batch) if mode == "reader" else batch[0].shape[0]


