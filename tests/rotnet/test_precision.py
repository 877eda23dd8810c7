"""train.precision / eval --precision 'auto': bf16 only where the device has it natively."""
import logging

import pytest
import torch

import rotnet.run as run_mod
from rotnet.config import ConfigError, load_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(run_mod, "native_bf16", lambda device: native)
    assert run_mod.resolve_precision("auto", CPU) == expected


def test_explicit_choice_is_kept_and_emulated_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(run_mod, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger=run_mod.log.name):
        assert run_mod.resolve_precision("bf16", CPU) == "bf16"
    assert "emulated" in caplog.text
    assert run_mod.resolve_precision("fp32", CPU) == "fp32"


def test_build_run_resolves_auto_in_the_config(monkeypatch):
    """The resolved config (config.yaml, checkpoints) records what ran, never 'auto'."""
    monkeypatch.setattr(run_mod, "native_bf16", lambda device: False)
    cfg = load_config("configs/sample.yaml", ["model.width=0.25", "train.precision=auto"])
    run = run_mod.build_run(cfg, run_mod.DistInfo(device=CPU), logger=None)
    assert cfg.train.precision == "fp32" and not run.scaler.is_enabled()


def test_unknown_precision_names_key_and_choices():
    with pytest.raises(ConfigError, match=r"train.precision='fp8': expected one of auto, bf16, fp16, fp32"):
        load_config("configs/sample.yaml", ["train.precision=fp8"])


def test_batch_preparer_keeps_float16_under_autocast_and_casts_for_fp32(monkeypatch):
    """Under autocast (bf16, fp16) a loader-normalised float16 batch is not cast to float32 only for
    autocast to cast it back: the model gets it as it is. An fp32 model gets float32."""
    monkeypatch.setattr(run_mod, "native_bf16", lambda device: True)
    cfg = load_config("configs/sample.yaml",
                      ["model.width=0.25", "train.channels_last=true", "train.precision=auto"])
    x16 = torch.randn(2, 8, 8, 3, dtype=torch.float16).permute(0, 3, 1, 2)   # the graph's NHWC memory
    for precision in ("bf16", "fp16"):
        out = run_mod.batch_preparer(cfg, precision)(x16)
        assert out.dtype == torch.float16 and out.data_ptr() == x16.data_ptr()   # no copy at all
    run = run_mod.build_run(cfg, run_mod.DistInfo(device=CPU), logger=None)
    assert run.prepare(x16).dtype == torch.float16
    out = run_mod.batch_preparer(cfg, "fp32")(x16)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    u8 = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    assert all(run_mod.batch_preparer(cfg, p)(u8).dtype == torch.float32 for p in ("bf16", "fp32"))
