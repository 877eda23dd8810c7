"""The config resolved once: what a run derives from cfg and its machine (the sample-data root, the
batch per rank, the precision) filled in before anything is written. A Config is frozen, so nothing
changes it afterwards; config.yaml and the checkpoints store the resolved one.

    cfg = resolve(load_config(path, overrides), info, require=("train",))   # train.py, benchmarks
    cfg = with_data_root(cfg, require=("train", "val"))   # eval.py (its batch and precision are flags)
"""
from __future__ import annotations

from pathlib import Path

from pipelines.sample_data import ensure_sample_data
from rotnet.config import Config, ConfigError, override, resolve_batch
from rotnet.distributed import DistInfo
from rotnet.precision import resolve_precision


def with_data_root(cfg: Config, require: tuple[str, ...] = ()) -> Config:
    """cfg with data.root set (an empty one: the built-in sample data); ConfigError if a `require`d
    split folder is missing, before anything is written."""
    root = cfg.data.root or str(ensure_sample_data(seed=cfg.data.sample_seed))
    for split in require:
        if not (Path(root) / split).is_dir():
            raise ConfigError(f"data.root={root!r} has no {split}/ folder; set "
                              "data.root=/path/to/dataset (ImageNet layout: SPLIT/CLASS/IMAGE.JPEG)")
    return override(cfg, {"data.root": root})


def resolve(cfg: Config, info: DistInfo, require: tuple[str, ...] = ()) -> Config:
    """cfg as a training run on `info`'s ranks and device carries it: data.root (`with_data_root`),
    both batch sizes (`resolve_batch`), train.precision without 'auto'."""
    cfg = resolve_batch(with_data_root(cfg, require), info.world_size)
    if cfg.train.sync_bn and info.device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); "
                          "set train.sync_bn=false")
    return override(cfg, {"train.precision": resolve_precision(cfg.train.precision, info.device)})
