"""Probe heads on one frozen trunk layer: (B, C, h, w) -> logits (B, num_classes); docs/eval.md.

linear (Table 5, `LinearProbe`), mlp (Table 4 `AlexNetNonLinearProbe` for AlexNet conv4/conv5, the
CIFAR `MLPProbe` elsewhere), conv (Table 3, `ConvProbe`). `parse_layers` reads eval.py --layer against
`valid_layers`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.alexnet import alexnet_fc_block
from models.rotnet import conv_bn_relu
from rotnet.cli import UsageError

HEADS = ("linear", "mlp", "conv")
TARGET_DIMS = 9000          # linear-probe input size of the paper (Table 5: ~9k dims per layer)
MLP_FLATTEN_MAX = 16384     # MLP flattens maps up to this size (NIN block2 at 32 px: 192x8x8, as the paper)
ALEXNET_NONLINEAR_LAYERS = ("conv4", "conv5")  # Table 4 defines non-linear heads for these only
NIN_BLOCK_WIDTH = 192


def pool_grid(channels: int, height: int, width: int, target: int = TARGET_DIMS) -> tuple[int, int]:
    """Grid (gh, gw) with channels*gh*gw ~= target (AlexNet at 224 px: the original 12, 7, 5, 6, 6),
    clamped to the map: more cells than the map has would only repeat values."""
    g = max(1, round(math.sqrt(target / channels)))
    return min(g, height), min(g, width)


def grid_pool(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Adaptive max-pool (B, C, h, w) -> (B, C, gh, gw), skipped (slow on CPU) when it is the identity."""
    return x if tuple(grid) == tuple(x.shape[2:]) else F.adaptive_max_pool2d(x, grid)


def _init_like_original(module: nn.Module, classifier: nn.Linear) -> None:
    """The original probe code's init (normal, std sqrt(2 / fan_out); BN 1, 0), except `classifier`:
    std 0.01 as MAE/DINO, since the original's 0.45 at 10 classes starts with a loss of ~50."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan = m.out_channels * math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else m.out_features
            nn.init.normal_(m.weight, 0.0, 0.01 if m is classifier else math.sqrt(2.0 / fan))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class LinearProbe(nn.Module):
    """(B, C, h, w) -> max-pool (B, C, gh, gw) -> BN (no affine) -> (B, C*gh*gw) -> (B, K).
    The affine-free BN is a fixed linear map at test time: the probe stays linear."""

    def __init__(self, channels: int, grid: tuple[int, int], num_classes: int):
        super().__init__()
        self.grid = grid
        self.in_dim = channels * grid[0] * grid[1]
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.fc = nn.Linear(self.in_dim, num_classes)
        _init_like_original(self, self.fc)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.bn(grid_pool(x, self.grid)), 1))  # flatten: may be channels_last


class MLPProbe(nn.Module):
    """CIFAR non-linear head: (B, C, h, w) -> max-pool to `grid` (the map's (h, w): none)
    -> flatten (B, D) -> FC-BN-ReLU (B, hidden) -> FC-BN-ReLU (B, hidden) -> Linear (B, K)."""

    def __init__(self, channels: int, grid: tuple[int, int], num_classes: int):
        super().__init__()
        self.hidden = min(20 * num_classes, 2048)  # original code; 200 for CIFAR-10 as in the paper
        self.grid = grid
        self.in_dim = channels * grid[0] * grid[1]
        h = self.hidden
        self.mlp = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(self.in_dim, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, num_classes),
        )
        _init_like_original(self, self.mlp[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(grid_pool(x, self.grid))


class AlexNetNonLinearProbe(nn.Module):
    """Paper Table 4 head. conv4 (B, C4, 13, 13): Conv3x3-BN-ReLU to C5 channels first; then pool5
    (B, C5, 6, 6) -> a fresh `alexnet_fc_block` (B, 4096*width) -> Linear (B, K)."""

    def __init__(self, trunk: nn.Module, layer: str, feat_shape: tuple[int, int, int], num_classes: int):
        super().__init__()   # layer: conv4 or conv5 (build_probe refuses others); feat_shape (C, h, w)
        in_channels, map_hw, conv5_channels = feat_shape[0], feat_shape[1:], trunk.layer_channels["conv5"]
        self.conv = (nn.Sequential(nn.Conv2d(in_channels, conv5_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(conv5_channels), nn.ReLU(inplace=True))
                     if layer == "conv4" else nn.Identity())
        self.pool5 = nn.MaxPool2d(3, stride=2)
        side = [(s - 3) // 2 + 1 for s in map_hw]
        if min(side) < 1:
            raise ValueError(f"alexnet {layer} map {map_hw} is too small for pool5; raise data.crop_size")
        self.fc_block = alexnet_fc_block(conv5_channels * side[0] * side[1], trunk.width)
        hidden = self.fc_block[-2].num_features  # BN1d of the last FC layer
        self.fc = nn.Linear(hidden, num_classes)
        _init_like_original(self, self.fc)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.fc_block(self.pool5(self.conv(x))))


class ConvProbe(nn.Module):
    """Paper Table 3 head: (B, C, h, w) -> NIN block (B, 192, h, w) -> GAP (B, 192) -> (B, K)."""

    def __init__(self, channels: int, num_classes: int, width: int = NIN_BLOCK_WIDTH):
        super().__init__()
        # The trunk's own NIN Conv-BN-ReLU, unpacked: flat keys (block.0 .. block.8) in probe states.
        self.block = nn.Sequential(*conv_bn_relu(channels, width, 3), *conv_bn_relu(width, width, 1),
                                   *conv_bn_relu(width, width, 1))
        self.fc = nn.Linear(width, num_classes)
        _init_like_original(self, self.fc)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.block(x).mean(dim=(2, 3)))


def valid_layers(head: str, trunk: nn.Module) -> list[str]:
    """Probe layers `head` is defined for on this trunk (`--layer all` means these)."""
    if head == "mlp" and trunk.arch == "alexnet":
        return list(ALEXNET_NONLINEAR_LAYERS)
    return list(trunk.layer_names)


def build_probe(head: str, trunk: nn.Module, layer: str, feat_shape: tuple[int, int, int],
                num_classes: int) -> nn.Module:
    """Fresh probe for `layer`, whose features have shape feat_shape = (C, h, w)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    layers = valid_layers(head, trunk)
    if layer not in layers:
        raise ValueError(f"--head {head} on {trunk.arch} is defined for layers {layers}, not {layer!r}")
    c, h, w = feat_shape
    if head == "linear":
        return LinearProbe(c, pool_grid(c, h, w), num_classes)
    if head == "conv":
        return ConvProbe(c, num_classes)
    if trunk.arch == "alexnet":
        return AlexNetNonLinearProbe(trunk, layer, feat_shape, num_classes)
    return MLPProbe(c, (h, w) if c * h * w <= MLP_FLATTEN_MAX else pool_grid(c, h, w), num_classes)


def parse_layers(text: str, trunk, head: str) -> list[str]:
    """'conv4' | 'conv2,conv4' | 'all' -> validated layers, shallow to deep, no duplicates."""
    valid = valid_layers(head, trunk)
    if text.strip() == "all":
        return valid
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in wanted if name not in valid]
    if bad or not wanted:
        where = f"--head {head} on {trunk.arch}" if valid != list(trunk.layer_names) else trunk.arch
        raise UsageError(f"--layer {text!r}: unknown layer(s) {', '.join(bad) or '(none given)'} for "
                         f"{where}; valid choices: {', '.join(valid)} or all")
    return sorted(set(wanted), key=valid.index)
