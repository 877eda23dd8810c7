"""train.precision / eval --precision 'auto': bf16 only where the device has it natively."""
import logging

import pytest
import torch

import rotnet.precision as precision_mod
from rotnet.config import ConfigError, load_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: native)
    assert precision_mod.resolve_precision("auto", CPU) == expected


def test_explicit_choice_is_kept_and_emulated_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger=precision_mod.log.name):
        assert precision_mod.resolve_precision("bf16", CPU) == "bf16"
    assert "emulated" in caplog.text
    assert precision_mod.resolve_precision("fp32", CPU) == "fp32"


def test_unknown_precision_names_key_and_choices():
    with pytest.raises(ConfigError, match=r"train.precision='fp8': expected one of auto, bf16, fp16, fp32"):
        load_config("configs/sample.yaml", ["train.precision=fp8"])
