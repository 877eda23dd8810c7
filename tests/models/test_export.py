"""models.export: torchvision/timm round trips for resnets, native round trips for alexnet/nin, refusals.

Checkpoints are random-init RotNets with randomised BatchNorm statistics (so a dropped or
misnamed BN buffer changes the features), written with rotnet.checkpoint.save_checkpoint as
train.py writes them. Inputs are 32-64 px, so the whole file takes seconds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from models import RotNet, build_model
from models.export import load_exported, main, read_metadata
from rotnet.checkpoint import atomic_save, save_checkpoint
from rotnet.config import config_from_dict, config_to_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_bn(net: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics, as after training."""
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.weight.data = 1 + 0.2 * torch.randn(n, generator=g)
            m.bias.data = 0.2 * torch.randn(n, generator=g)
            m.running_mean = 0.3 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)
            m.num_batches_tracked.fill_(7)


def _checkpoint(root: Path, arch: str, width: float, crop: int, num_blocks: int = 4) -> tuple[Path, RotNet]:
    """(root/NAME/checkpoint.pt, the RotNet saved in it) for a 3-epoch "run" of `arch`."""
    cfg = config_from_dict({"data": {"crop_size": crop},
                            "model": {"arch": arch, "width": width, "num_blocks": num_blocks}})
    net = build_model(cfg, 0)
    _randomise_bn(net, torch.Generator().manual_seed(1))
    out = root / f"{arch}_w{width}"
    out.mkdir(parents=True)
    path = save_checkpoint({"model": net.state_dict(), "config": config_to_dict(cfg), "epoch": 3,
                            "epoch_step": 0, "commit": "abc123def456"}, out, keep_last=0, numbered=False)
    return path, net.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {"root": root,
            "resnet18": _checkpoint(root, "resnet18", 1.0, 32),
            "alexnet": _checkpoint(root, "alexnet", 0.25, 64),
            "nin": _checkpoint(root, "nin", 0.25, 32, num_blocks=3)}


def _refused(capsys, *args: str) -> str:
    """stderr of a main() call that must exit 2 with a one-line error."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------------- torchvision / timm

def _torchvision_layer4(m: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet up to layer4: (B, 3, H, W) -> (B, C, h, w)."""
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def test_resnet18_loads_into_torchvision_with_equal_features(runs):
    ckpt, net = runs["resnet18"]
    out = main([str(ckpt), "--format", "torchvision"])
    assert out == ckpt.with_name("checkpoint_torchvision.safetensors")

    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(load_file(out), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    tv.fc = nn.Identity()
    tv.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(_torchvision_layer4(tv, x), net.trunk.features(x, "layer4")["layer4"])
        torch.testing.assert_close(tv(x), net.trunk(x))   # pooled features, (2, 512)
        # the same file read back as a rotnet trunk
        torch.testing.assert_close(load_exported(out)(x), net.trunk(x))

    meta = read_metadata(out)
    assert {k: meta[k] for k in ("format", "arch", "width", "input_size", "epochs", "commit")} == {
        "format": "torchvision", "arch": "resnet18", "width": "1.0", "input_size": "32", "epochs": "3",
        "commit": "abc123def456"}
    assert json.loads(meta["rotations"]) == [0, 90, 180, 270]
    assert config_from_dict(json.loads(meta["config"])).model.arch == "resnet18"


def test_resnet50_keys_match_torchvision(tmp_path):
    ckpt, net = _checkpoint(tmp_path, "resnet50", 1.0, 32)
    out = main([str(ckpt), "--out", str(tmp_path / "r50.safetensors")])   # torchvision is the default
    tv = torchvision.models.resnet50()
    result = tv.load_state_dict(load_file(out), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    tv.fc = nn.Identity()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), net.trunk(x))   # (1, 2048)


def test_pth_is_a_plain_state_dict_and_timm_is_the_same_file(runs, tmp_path):
    ckpt, _ = runs["resnet18"]
    pth = main([str(ckpt), "--out", str(tmp_path / "r18.pth")])
    plain = torch.load(pth, weights_only=True)   # what detectron2's converter torch.loads
    assert all(isinstance(v, torch.Tensor) for v in plain.values())
    reference = torchvision.models.resnet18().state_dict()
    assert set(plain) == set(reference) - {"fc.weight", "fc.bias"}

    timm_file = main([str(ckpt), "--format", "timm", "--out", str(tmp_path / "r18_timm.safetensors")])
    timm_state = load_file(timm_file)
    assert timm_state.keys() == plain.keys() and all(torch.equal(timm_state[k], plain[k]) for k in plain)
    assert read_metadata(timm_file)["format"] == "timm"


# ---------------------------------------------------------------------------- native (alexnet, nin)

@pytest.mark.parametrize("arch", ["alexnet", "nin"])
def test_native_round_trip(runs, arch):
    ckpt, net = runs[arch]
    out = main([str(ckpt), "--format", "native"])
    trunk = load_exported(out)
    assert (trunk.arch, trunk.width, trunk.layer_names) == (arch, 0.25, net.trunk.layer_names)
    assert not trunk.training
    side = 64 if arch == "alexnet" else 32
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = trunk.features(x, trunk.layer_names), net.trunk.features(x, trunk.layer_names)
        for name in trunk.layer_names:
            torch.testing.assert_close(got[name], want[name])
        torch.testing.assert_close(trunk(x), net.trunk(x))
    meta = read_metadata(out)
    got = (meta["format"], meta["arch"], meta["width"], meta["input_size"])
    assert got == ("native", arch, "0.25", str(side))


# ---------------------------------------------------------------------------- refusals

def test_refuses_what_is_not_a_trunk_checkpoint(runs, capsys, tmp_path):
    probe_state = tmp_path / "probe_state_pretrained.pt"
    atomic_save({"version": 1, "signature": {}, "epoch": 1, "probes": {}, "optimizer": {}, "trunk": None,
                 "result": None, "history": []}, probe_state)
    assert "eval.py probe state" in _refused(capsys, probe_state)

    no_config = tmp_path / "weights.pt"
    atomic_save({"model": runs["nin"][1].state_dict()}, no_config)
    assert "no 'config' key" in _refused(capsys, no_config)

    a_list = tmp_path / "list.pt"
    atomic_save([torch.ones(2)], a_list)
    assert "not a rotnet checkpoint (a list" in _refused(capsys, a_list)

    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a checkpoint\n")
    assert f"cannot load checkpoint {garbage}: UnpicklingError" in _refused(capsys, garbage)
    assert "checkpoint not found" in _refused(capsys, tmp_path / "missing.pt")

    export = main([str(runs["nin"][0]), "--format", "native", "--out", str(tmp_path / "nin.safetensors")])
    assert "already an export" in _refused(capsys, export)


def test_refuses_weights_that_do_not_match_the_config(runs, capsys, tmp_path):
    ckpt, net = runs["nin"]
    raw = torch.load(ckpt, weights_only=True)
    raw["config"]["model"]["width"] = 0.5
    atomic_save(raw, tmp_path / "mismatch.pt")
    err = _refused(capsys, tmp_path / "mismatch.pt")
    assert "mismatch.pt: weights do not match its config (model.arch=nin, width=0.5," in err


def test_refuses_what_torchvision_cannot_hold(runs, capsys, tmp_path):
    assert "BatchNorm" in _refused(capsys, runs["alexnet"][0], "--format", "torchvision")
    assert "torchvision has no nin" in _refused(capsys, runs["nin"][0], "--format", "timm")
    narrow, _ = _checkpoint(tmp_path, "resnet18", 0.5, 32)
    assert "resnet18 at width 0.5" in _refused(capsys, narrow, "--format", "torchvision")
    assert ".safetensors only" in _refused(capsys, runs["nin"][0], "--format", "native",
                                           "--out", tmp_path / "n.pth")
    assert "use a .safetensors name" in _refused(capsys, runs["nin"][0], "--out", tmp_path / "n.bin")


def test_a_bug_keeps_its_traceback_and_an_unwritable_out_is_one_line(runs, capsys, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where --out's folder should be")
    out = tmp_path / "file" / "nin.safetensors"
    assert f"cannot write {out}" in _refused(capsys, runs["nin"][0], "--format", "native", "--out", out)

    def broken(*a, **kw):
        raise RuntimeError("a bug in building the trunk")

    monkeypatch.setattr("models.export.build_model", broken)
    with pytest.raises(RuntimeError, match="a bug in building the trunk"):   # not turned into one line
        main([str(runs["nin"][0]), "--format", "native", "--out", str(tmp_path / "n.safetensors")])


def test_existing_out_needs_force(runs, capsys, tmp_path):
    ckpt, net = runs["nin"]
    out = tmp_path / "nin.safetensors"
    out.write_bytes(b"keep me")
    assert f"{out} exists; pass --force" in _refused(capsys, ckpt, "--format", "native", "--out", out)
    assert out.read_bytes() == b"keep me"
    main([str(ckpt), "--format", "native", "--out", str(out), "--force"])
    assert load_exported(out).out_dim == net.trunk.out_dim
    assert [p.name for p in tmp_path.iterdir()] == ["nin.safetensors"]   # no temp file left behind



def test_a_full_disk_is_one_line_with_the_bytes_and_no_temp_file(runs, capsys, full_disk):
    out = full_disk / "r18.safetensors"
    err = _refused(capsys, runs["resnet18"][0], "--out", out)
    assert err.startswith(f"error: disk full writing {out}: it needs ") and " bytes free there" in err
    assert [n for n in os.listdir(full_disk) if n != ".filler"] == []


def test_the_settings_from_the_checkpoint_are_named_and_a_model_override_refused(runs, capsys, tmp_path):
    ckpt = runs["alexnet"][0]
    main([str(ckpt), "--format", "native", "--out", str(tmp_path / "a.safetensors")])
    assert capsys.readouterr().out.startswith(f"settings from the checkpoint {ckpt}: model.arch=alexnet "
                                              "model.width=0.25 ")
    assert "unrecognized arguments: model.arch=resnet18" in _refused(capsys, ckpt, "model.arch=resnet18")
