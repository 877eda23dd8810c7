"""run_builder: the config resolved once (batch, precision, sample-data root), then the run built
from it."""
import pytest
import torch

import rotnet.precision
import run_builder
from rotnet.config import ConfigError, load_config
from rotnet.distributed import DistInfo
from run_builder import resolve, with_data_root

CPU = torch.device("cpu")


def test_build_run_derives_the_per_gpu_batch_and_keeps_the_lr(monkeypatch):
    """resolve + build_run (train.py and the benchmarks) on 2 ranks: global 192 -> 96 per GPU, the
    paper's lr unscaled; with optim.scale_lr the scale follows the global batch."""
    monkeypatch.setattr(run_builder, "place", lambda raw, info, channels_last: raw)   # no process group
    two = DistInfo(rank=0, world_size=2, device=CPU)
    cfg = load_config("configs/imagenet_alexnet.yaml", ["model.width=0.25", "data.crop_size=64"])
    cfg = resolve(cfg, two)
    run = run_builder.build_run(cfg, two, logger=None)
    assert (cfg.optim.global_batch_size, cfg.optim.batch_size_per_gpu) == (192, 96)
    assert run.schedule(0) == pytest.approx(0.01) and run.schedule.scale == 1.0
    scaled = load_config(None, ["optim.batch_size_per_gpu=64", "optim.scale_lr=true", "optim.ref_batch=256",
                                "model.width=0.25", "data.crop_size=64", "data.root=unused"])
    assert run_builder.build_run(resolve(scaled, two), two, logger=None).schedule.scale == 0.5   # 128 / 256


def test_resolve_returns_a_new_config_without_auto(monkeypatch):
    """The resolved config (config.yaml, checkpoints) records what ran, never 'auto'; the loaded
    one is left as it was, and build_run refuses an unresolved one."""
    monkeypatch.setattr(rotnet.precision, "native_bf16", lambda device: False)
    cfg = load_config("configs/sample.yaml", ["model.width=0.25", "train.precision=auto", "data.root=x"])
    resolved = resolve(cfg, DistInfo(device=CPU))
    assert resolved.train.precision == "fp32" and cfg.train.precision == "auto"
    assert not run_builder.build_run(resolved, DistInfo(device=CPU), logger=None).scaler.is_enabled()
    with pytest.raises(ValueError, match="resolved config"):
        run_builder.build_run(cfg, DistInfo(device=CPU), logger=None)


def test_resolve_refuses_missing_splits_and_sync_bn_on_cpu(tmp_path):
    (tmp_path / "train").mkdir()
    cfg = load_config(None, [f"data.root={tmp_path}"])
    assert with_data_root(cfg, require=("train",)).data.root == str(tmp_path)
    with pytest.raises(ConfigError, match=r"data.root='.*' has no val/ folder"):
        with_data_root(cfg, require=("train", "val"))
    sync = load_config(None, [f"data.root={tmp_path}", "train.sync_bn=true"])
    with pytest.raises(ConfigError, match="train.sync_bn=true needs CUDA"):
        resolve(sync, DistInfo(device=CPU))


def test_batch_preparer_keeps_float16_under_autocast_and_casts_for_fp32(monkeypatch):
    """Under autocast (bf16, fp16) a loader-normalised float16 batch is not cast to float32 only for
    autocast to cast it back: the model gets it as it is. An fp32 model gets float32."""
    monkeypatch.setattr(rotnet.precision, "native_bf16", lambda device: True)
    cfg = load_config("configs/sample.yaml",
                      ["model.width=0.25", "train.channels_last=true", "train.precision=auto", "data.root=x"])
    x16 = torch.randn(2, 8, 8, 3, dtype=torch.float16).permute(0, 3, 1, 2)   # the graph's NHWC memory
    for precision in ("bf16", "fp16"):
        out = run_builder.batch_preparer(cfg, precision)(x16)
        assert out.dtype == torch.float16 and out.data_ptr() == x16.data_ptr()   # no copy at all
    run = run_builder.build_run(resolve(cfg, DistInfo(device=CPU)), DistInfo(device=CPU), logger=None)
    assert run.prepare(x16).dtype == torch.float16
    out = run_builder.batch_preparer(cfg, "fp32")(x16)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    u8 = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    assert all(run_builder.batch_preparer(cfg, p)(u8).dtype == torch.float32 for p in ("bf16", "fp32"))
