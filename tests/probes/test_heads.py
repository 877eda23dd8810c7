"""Probe heads: the paper's pooling grid and every head's output shape."""
from __future__ import annotations

import pytest
import torch

from models import MODELS
from probes.heads import TARGET_DIMS, build_probe, pool_grid, valid_layers
from rotnet.config import ModelConfig

# Original FeatureLearningRotNet config ImageNet_LinearClassifiers_ImageNet_RotNet_AlexNet_Features.py
PAPER_ALEXNET_GRID = {"conv1": 12, "conv2": 7, "conv3": 5, "conv4": 6, "conv5": 6}


def _trunk(arch: str, width: float, size: int):
    return MODELS[arch](ModelConfig(arch=arch, width=width), size)


def _shapes(trunk, size):
    with torch.no_grad():
        feats = trunk.eval().features(torch.zeros(2, 3, size, size), trunk.layer_names)
    return {k: tuple(v.shape[1:]) for k, v in feats.items()}


def test_alexnet_224_grid_matches_original_and_is_about_9000_dims():
    shapes = _shapes(_trunk("alexnet", 1.0, 224), 224)
    for layer, (c, h, w) in shapes.items():
        g = pool_grid(c, h, w)
        assert g == (PAPER_ALEXNET_GRID[layer],) * 2, layer
        assert 0.9 * TARGET_DIMS <= c * g[0] * g[1] <= 1.1 * TARGET_DIMS, layer


def test_grid_never_exceeds_map():
    assert pool_grid(3, 4, 5) == (4, 5)          # sqrt(9000/3) = 55 > map: clamp, no upsampling
    assert pool_grid(8192, 7, 7) == (1, 1)       # huge C: at least one cell


@pytest.mark.parametrize("arch,width,size",
                         [("alexnet", 0.25, 96), ("resnet18", 0.25, 64), ("nin", 0.25, 32)])
@pytest.mark.parametrize("head", ["linear", "mlp", "conv"])
def test_head_output_shapes(arch, width, size, head):
    trunk = _trunk(arch, width, size).eval()
    layers = valid_layers(head, trunk)
    if arch == "alexnet" and head == "mlp":
        assert layers == ["conv4", "conv5"]      # paper Table 4 defines these two only
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        feats = trunk.features(x, layers)
    for layer in layers:
        probe = build_probe(head, trunk, layer, tuple(feats[layer].shape[1:]), num_classes=7).eval()
        with torch.no_grad():
            assert probe(feats[layer]).shape == (3, 7), (layer, head)


def test_alexnet_mlp_refuses_shallow_layer():
    trunk = _trunk("alexnet", 0.25, 96)
    with pytest.raises(ValueError, match="conv4"):
        build_probe("mlp", trunk, "conv2", (48, 11, 11), 10)


def test_linear_probe_bn_has_no_affine():
    trunk = _trunk("nin", 0.25, 32)
    probe = build_probe("linear", trunk, "block2", (48, 8, 8), 10)
    assert not probe.bn.affine and probe.in_dim == 48 * 8 * 8
