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
