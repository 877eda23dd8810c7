"""train.py's run builder: the config resolved once (batch, precision, sample-data root), then the run
built from it."""
import logging

import pytest
import torch

import rotnet.distributed
import train
from pipelines import rotation_loaders
from rotnet.config import ConfigError, load_config
from rotnet.distributed import DistInfo
from rotnet.progress import log
from tests.pipelines.images import make_folder
from train import resolve

CPU = torch.device("cpu")


def test_build_run_derives_the_per_gpu_batch_and_keeps_the_lr(monkeypatch):
    """resolve + build_run (train.py and the benchmarks) on 2 ranks: global 192 -> 96 per GPU, the
    paper's lr unscaled; with optim.scale_lr the scale follows the global batch."""
    monkeypatch.setattr(train, "place", lambda raw, info, channels_last: raw)   # no process group
    two = DistInfo(rank=0, world_size=2, device=CPU)
    cfg = load_config("configs/imagenet_alexnet.yaml", ["model.width=0.25", "data.crop_size=64"])
    cfg = resolve(cfg, two)
    run = train.build_run(cfg, two, logger=None, loaders=False)
    assert (cfg.optim.global_batch_size, cfg.optim.batch_size_per_gpu) == (192, 96)
    assert run.schedule(0) == pytest.approx(0.01) and run.schedule.scale == 1.0
    scaled = load_config(None, ["optim.batch_size_per_gpu=64", "optim.scale_lr=true", "optim.ref_batch=256",
                                "model.width=0.25", "data.crop_size=64", "data.root=unused"])
    run = train.build_run(resolve(scaled, two), two, logger=None, loaders=False)
    assert run.schedule.scale == 0.5   # 128 / 256


def test_resolve_returns_a_new_config_without_auto(monkeypatch):
    """The resolved config (config.yaml, checkpoints) records what ran, never 'auto'; the loaded
    one is left as it was, and build_run refuses an unresolved one."""
    monkeypatch.setattr(rotnet.distributed, "native_bf16", lambda device: False)
    cfg = load_config("configs/sample.yaml", ["model.width=0.25", "train.precision=auto", "data.root=x"])
    resolved = resolve(cfg, DistInfo(device=CPU))
    assert resolved.train.precision == "fp32" and cfg.train.precision == "auto"
    run = train.build_run(resolved, DistInfo(device=CPU), logger=None, loaders=False)
    assert not run.scaler.is_enabled()
    with pytest.raises(ValueError, match="resolved config"):
        train.build_run(cfg, DistInfo(device=CPU), logger=None, loaders=False)


def test_resolve_refuses_missing_splits_and_sync_bn_on_cpu(tmp_path):
    (tmp_path / "train").mkdir()
    cfg = load_config(None, [f"data.root={tmp_path}"])
    assert resolve(cfg, DistInfo(device=CPU), splits=("train",)).data.root == str(tmp_path)
    with pytest.raises(ConfigError, match=r"data.root='.*' has no val/ folder"):
        resolve(cfg, DistInfo(device=CPU), splits=("train", "val"))
    sync = load_config(None, [f"data.root={tmp_path}", "train.sync_bn=true"])
    with pytest.raises(ConfigError, match="train.sync_bn=true needs CUDA"):
        resolve(sync, DistInfo(device=CPU))


def test_the_run_preparer_keeps_float16_under_autocast(monkeypatch):
    """run.prepare is pipelines.batch_preparer (tests/pipelines/test_batch.py) at the resolved precision."""
    monkeypatch.setattr(rotnet.distributed, "native_bf16", lambda device: True)
    cfg = load_config("configs/sample.yaml", ["model.width=0.25", "train.precision=auto", "data.root=x"])
    run = train.build_run(resolve(cfg, DistInfo(device=CPU)), DistInfo(device=CPU), logger=None,
                                loaders=False)
    assert run.prepare(torch.zeros(2, 3, 8, 8, dtype=torch.float16)).dtype == torch.float16
    assert run.loader is None and run.monitor is None


def test_build_run_builds_the_loaders_and_runs_without_an_unlabelled_monitor(tmp_path, caplog):
    """With loaders (train.py): the train split's loader at the per-rank batch; no val/ folder: no
    held-out loader and the kNN monitor off, each with a warning naming why, not an error."""
    make_folder(tmp_path / "train", [4, 4], size=(72, 72))
    cfg = load_config("configs/sample.yaml", [
        f"data.root={tmp_path}", "model.width=0.25", "data.crop_size=64", "data.resize_size=72",
        "optim.batch_size_per_gpu=2", "train.monitor_every=1", "train.eval_rotation_every=1",
        "train.precision=fp32", "loader.backend=torch", "loader.num_threads=0"])
    info = DistInfo(device=CPU)
    with caplog.at_level(logging.WARNING, logger=log.name):
        run = train.build_run(resolve(cfg, info), info, logger=None)
    assert len(run.loader) == 4 and run.val_loader is None and run.monitor is None
    assert "the kNN monitor is off for this run (train.monitor_every=1)" in caplog.text
    assert f"no held-out rotation accuracy (train.eval_rotation_every=1): {tmp_path / 'val'}" in caplog.text


def test_rotation_loaders_build_the_held_out_loader_unless_told_not_to(tmp_path):
    """train.eval_rotation_every and a val/ folder: a held-out loader of the eval recipe; val=False (the
    benchmarks that time the train loader alone): the same train loader and no held-out one."""
    make_folder(tmp_path / "train", [4, 4], size=(72, 72))
    make_folder(tmp_path / "val", [2, 2], size=(72, 72))
    cfg = load_config("configs/sample.yaml", [
        f"data.root={tmp_path}", "data.crop_size=64", "data.resize_size=72", "optim.batch_size_per_gpu=2",
        "train.eval_rotation_every=1", "train.precision=fp32", "loader.backend=torch",
        "loader.num_threads=0"])
    info = DistInfo(device=CPU)
    cfg = resolve(cfg, info)
    train, val = rotation_loaders(cfg, info)
    assert len(train) == 4 and val is not None and len(val) == 2
    alone, none = rotation_loaders(cfg, info, val=False)
    assert none is None and len(alone) == len(train)
