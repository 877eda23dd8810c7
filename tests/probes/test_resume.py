"""probes/resume.py: a probe state resumes only under the signature that made it, read in today's keys."""
import pytest

from probes.resume import ResumeMismatch, load_state
from rotnet.checkpoint import atomic_save
from rotnet.cli import UsageExit, fail
from rotnet.config import config_to_dict, load_config

DATA = config_to_dict(load_config(None, ["data.root=/d", "data.crop_size=64"]))["data"]


def _signature(data: dict) -> dict:
    return {"model": "pretrained", "checkpoint": "/runs/x/checkpoint.pt", "world_size": 1, "data": data,
            "probe": {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}}


def _saved(tmp_path, data: dict):
    path = tmp_path / "probe_state_pretrained.pt"
    atomic_save({"version": 1, "signature": _signature(data), "epoch": 3, "result": None, "history": []},
                path)
    return path


def test_a_state_signed_with_retired_data_keys_resumes(tmp_path):
    """data.sample_seed (retired) and data.backend (now loader.backend) in an older state's signature
    say nothing about the numbers today's signature does not: the run resumes."""
    path = _saved(tmp_path, {**DATA, "sample_seed": 0, "backend": "torch"})
    assert load_state(path, _signature(DATA))["epoch"] == 3


def test_a_state_with_other_data_is_refused_in_one_line_naming_the_key(tmp_path, capsys):
    path = _saved(tmp_path, {**DATA, "sample_seed": 0, "crop_size": 32})
    with pytest.raises(ResumeMismatch) as e:
        load_state(path, _signature(DATA))
    with pytest.raises(UsageExit):
        fail(e.value)
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "sample_seed" not in line
    assert line.startswith(f"error: {path} is from an eval run with different arguments: data: saved run has")
    assert "'crop_size': 32" in line and "'crop_size': 64" in line
