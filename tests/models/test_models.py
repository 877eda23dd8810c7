"""Shape, registry and contract tests for models/ (CPU, a few seconds)."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models import resnet50 as tv_resnet50

from models import MODELS, build_model
from models.alexnet import alexnet_fc_block
from models.rotnet import RotationHead
from rotnet.checkpoint import CheckpointError
from rotnet.config import ConfigError, ModelConfig, config_from_dict

torch.manual_seed(0)


def _x(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def _trunk(arch: str, width: float = 1.0, num_blocks: int = 4, input_size: int = 224):
    """The registry's trunk, as models.build_model builds it."""
    return MODELS[arch](ModelConfig(arch=arch, width=width, num_blocks=num_blocks), input_size)


def _head(trunk, k: int = 4) -> RotationHead:
    return RotationHead(trunk.out_dim, k)


def _check_features(trunk, x, expected: dict[str, tuple[int, ...]]) -> None:
    trunk.eval()
    with torch.no_grad():
        feats = trunk.features(x, list(expected))
    assert list(feats) == list(expected)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected
    for name, shape in expected.items():
        assert trunk.layer_channels[name] == shape[1]


def test_alexnet_full_width_shapes_at_224():
    trunk = _trunk("alexnet")
    assert trunk.layer_names == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    x = _x(224, batch=1)
    _check_features(trunk, x, {
        "conv1": (1, 64, 55, 55), "conv2": (1, 192, 27, 27), "conv3": (1, 384, 13, 13),
        "conv4": (1, 256, 13, 13), "conv5": (1, 256, 13, 13),
    })
    assert trunk.fc_in_features == 256 * 6 * 6 and trunk.out_dim == 4096
    with torch.no_grad():
        assert trunk.eval()(x).shape == (1, 4096)


@pytest.mark.parametrize("size", [64, 96])
def test_alexnet_small_inputs_and_fc_block(size):
    trunk = _trunk("alexnet", width=0.25, input_size=size)
    head = _head(trunk)
    assert head(trunk(_x(size))).shape == (2, 4)
    fresh = alexnet_fc_block(trunk.fc_in_features, trunk.width)   # what the conv4/conv5 mlp probes retrain
    assert fresh is not trunk.fc_block
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in trunk.fc_block.parameters()]
    assert isinstance(alexnet_fc_block(trunk.fc_in_features, 0.25), torch.nn.Sequential)


def test_alexnet_wrong_input_size_is_explained():
    trunk = _trunk("alexnet", width=0.25, input_size=64)
    with pytest.raises(ValueError, match="input_size=64"):
        trunk(_x(96))
    with pytest.raises(ConfigError, match="data.crop_size=32 is too small"):
        _trunk("alexnet", input_size=32)


@pytest.mark.parametrize("arch,exp", [("resnet18", 1), ("resnet50", 4)])
def test_resnet_shapes_at_224(arch, exp):
    trunk = _trunk(arch, width=0.25)
    _check_features(trunk, _x(224, batch=1), {
        "conv1": (1, 16, 56, 56), "layer1": (1, 16 * exp, 56, 56), "layer2": (1, 32 * exp, 28, 28),
        "layer3": (1, 64 * exp, 14, 14), "layer4": (1, 128 * exp, 7, 7),
    })
    assert trunk.out_dim == 128 * exp


@pytest.mark.parametrize("arch,tv", [("resnet18", tv_resnet18), ("resnet50", tv_resnet50)])
def test_resnet_width1_matches_torchvision(arch, tv):
    ours, tv_model = _trunk(arch), tv(weights=None)
    theirs = {k: v.shape for k, v in tv_model.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    n_tv = sum(p.numel() for p in tv_model.parameters()) - sum(p.numel() for p in tv_model.fc.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_tv
    assert ours.out_dim == tv_model.fc.in_features


@pytest.mark.parametrize("num_blocks", [3, 4, 5])
def test_nin_shapes_at_32(num_blocks):
    trunk = _trunk("nin", num_blocks=num_blocks)
    # blocks 3+ keep the 8x8 map (the authors' CIFAR configs: use_avg_on_conv3 False)
    expected = {"block1": (2, 96, 16, 16), "block2": (2, 192, 8, 8)}
    expected.update({f"block{k}": (2, 192, 8, 8) for k in range(3, num_blocks + 1)})
    assert trunk.layer_names == list(expected)
    _check_features(trunk, _x(32), expected)
    assert _head(trunk)(trunk(_x(32))).shape == (2, 4)


def test_nin_rejects_bad_num_blocks():
    with pytest.raises(ConfigError, match="model.num_blocks=2"):
        _trunk("nin", num_blocks=2)


@pytest.mark.parametrize("arch,size", [("alexnet", 64), ("resnet18", 64), ("resnet50", 64), ("nin", 32)])
def test_forward_rotation_logits_and_width_rounding(arch, size):
    trunk = _trunk(arch, width=0.1, input_size=size)
    logits = _head(trunk)(trunk(_x(size)))
    assert logits.shape == (2, 4)
    assert trunk.arch == arch and trunk.width == 0.1
    logits.sum().backward()  # the whole graph is differentiable


@pytest.mark.parametrize("arch,size", [("alexnet", 64), ("resnet18", 64), ("nin", 32)])
def test_features_exact_keys_and_errors(arch, size):
    trunk = _trunk(arch, width=0.25, input_size=size).eval()
    names = trunk.layer_names
    with torch.no_grad():
        assert list(trunk.features(_x(size), [names[2], names[0]])) == [names[2], names[0]]
        assert list(trunk.features(_x(size), names[1])) == [names[1]]
    with pytest.raises(ValueError) as err:
        trunk.features(_x(size), [names[0], "fc9"])
    assert "fc9" in str(err.value) and all(n in str(err.value) for n in names)
    with pytest.raises(ValueError):
        trunk.features(_x(size), [])


def test_features_stops_at_deepest_requested_layer():
    trunk = _trunk("resnet18", width=0.25).eval()
    ran = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(trunk, name).register_forward_hook(lambda m, i, o, n=name: ran.append(n))
    with torch.no_grad():
        trunk.features(_x(64), ["layer2"])
    assert ran == ["layer1", "layer2"]


@pytest.mark.parametrize("arch,size", [("alexnet", 64), ("resnet18", 64), ("nin", 32)])
def test_features_channels_last_and_bf16_autocast(arch, size):
    trunk = _trunk(arch, width=0.25, input_size=size).eval().to(memory_format=torch.channels_last)
    x = _x(size).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = trunk.features(x.contiguous(), trunk.layer_names)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = trunk.features(x, trunk.layer_names)
            out = trunk(x)
    assert out.shape == (2, trunk.out_dim)
    for name in trunk.layer_names:
        assert feats[name].shape == ref[name].shape
        assert torch.isfinite(feats[name].float()).all()


def test_registry_and_unknown_arch():
    assert set(MODELS) == {"alexnet", "resnet18", "resnet50", "nin"}
    with pytest.raises(ConfigError) as err:   # the config names the valid archs before any model is built
        config_from_dict({"model": {"arch": "vgg16"}})
    msg = str(err.value)
    assert "vgg16" in msg and all(name in msg for name in MODELS)


def test_width_must_be_positive():
    with pytest.raises(ConfigError, match="model.width=0"):
        _trunk("nin", width=0)


def test_build_model_is_seeded_and_loads_strictly():
    """Same seed, same weights; a checkpoint's weights load over the init; weights of another
    width are refused naming the source and the config."""
    cfg = config_from_dict({"data": {"crop_size": 32},
                            "model": {"arch": "nin", "width": 0.125, "num_blocks": 3}})
    a, b = build_model(cfg, 7), build_model(cfg, 7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert list(a.state_dict())[0].startswith("trunk.") and "head.fc.weight" in a.state_dict()
    assert a(_x(32)).shape == (2, len(cfg.data.rotations))
    c = build_model(cfg, 8, a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    wide = config_from_dict({"data": {"crop_size": 32},
                             "model": {"arch": "nin", "width": 0.25, "num_blocks": 3}})
    with pytest.raises(CheckpointError, match="runs/x.pt: weights do not match its config"):
        build_model(wide, 0, a.state_dict(), source="runs/x.pt")
