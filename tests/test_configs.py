"""The shipped configs load strictly and encode the protocols their headers describe."""
from __future__ import annotations

from pathlib import Path

import pytest

from rotnet.config import load_config, resolve_batch
from rotnet.schedule import StepSchedule

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
REAL_DATA = [p for p in CONFIGS if p.name != "sample.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_every_schedule_entry_is_reached(path):
    cfg = load_config(path)   # the tables are checked as it loads (rotnet.config.check_schedule)
    assert cfg.optim.schedule[-1][0] < cfg.optim.epochs
    assert cfg.probe.schedule[-1][0] < cfg.probe.epochs


@pytest.mark.parametrize("path", REAL_DATA, ids=lambda p: p.name)
def test_real_data_configs_require_root(path):
    # "" would silently mean the built-in sample data; these configs must be pointed at data.
    assert load_config(path).data.root == "REQUIRED"
    assert load_config(path, ["data.root=/data/x"]).data.root == "/data/x"


def test_cifar_paper_protocol():
    cfg = load_config(Path(CONFIGS[0]).parent / "cifar10_nin.yaml")
    assert (cfg.model.arch, cfg.model.num_blocks, cfg.model.width) == ("nin", 4, 1.0)
    assert cfg.optim.batch_size_per_gpu == 128 and cfg.optim.epochs == 100
    lr = StepSchedule(cfg.optim.schedule)
    assert [lr(e) for e in (0, 29.9, 30, 60, 80, 99)] == pytest.approx(
        [0.1, 0.1, 0.02, 0.004, 0.0008, 0.0008])
    assert cfg.data.recipe == "cifar" and cfg.data.val_dir == "test" and cfg.loader.resident


def test_imagenet_alexnet_paper_protocol():
    path = Path(CONFIGS[0]).parent / "imagenet_alexnet.yaml"
    cfg = resolve_batch(load_config(path), world_size=1)   # the paper: one GPU, 192 originals per step
    assert cfg.optim.batch_size_per_gpu == 192 and cfg.optim.epochs == 30
    eight = resolve_batch(load_config(path), world_size=8)   # README's 8-GPU command: the same 192 per step
    assert (eight.optim.global_batch_size, eight.optim.batch_size_per_gpu) == (192, 24)
    assert eight.optim.schedule == cfg.optim.schedule and not eight.optim.scale_lr
    lr = StepSchedule(cfg.optim.schedule)
    assert [lr(e) for e in (0, 10, 20)] == pytest.approx([0.01, 0.001, 0.0001])
    assert cfg.probe.head == "linear" and cfg.probe.epochs == 35


def test_resnet50_scales_lr_with_warmup():
    cfg = load_config(Path(CONFIGS[0]).parent / "imagenet_resnet50.yaml")
    assert cfg.optim.scale_lr and cfg.optim.warmup_epochs > 0
    lr = StepSchedule(cfg.optim.schedule, scale=1024 / cfg.optim.ref_batch,
                      warmup_epochs=cfg.optim.warmup_epochs)
    assert lr(10) == pytest.approx(1.6) and lr(0) < 0.01
