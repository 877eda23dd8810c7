"""ResNet-18/50 trunks built from torchvision's blocks, with a width multiplier.

At width 1.0 the module tree, parameter names and shapes are exactly torchvision's
`resnet18`/`resnet50` minus `fc` (so torchvision state_dicts load with strict=False
after dropping fc.*). torchvision's ResNet hard-codes 64/128/256/512 channels, so
the stem and `_make_layer` are re-done here with scaled channels; the residual
blocks themselves are torchvision's `BasicBlock`/`Bottleneck`.

Probe points (224 px input, width 1; C = 64/128/256/512 x block expansion):
    conv1  stem output, i.e. after conv1-bn1-relu-maxpool  (B, 64, 56, 56)
    layer1 (B, 64|256, 56, 56)    layer2 (B, 128|512, 28, 28)
    layer3 (B, 256|1024, 14, 14)  layer4 (B, 512|2048, 7, 7)
forward: global average pool of layer4 -> (B, 512|2048 x width).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.trunk import ProbeTrunk, init_weights, scale_channels

Block = type[nn.Module]   # torchvision's BasicBlock or Bottleneck


def _make_layer(block: Block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage, as torchvision builds it: (B, inplanes, H, W) -> (B, planes*exp, H/s, W/s)."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        conv = nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False)   # torchvision's conv1x1
        downsample = nn.Sequential(conv, nn.BatchNorm2d(out))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(out, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNetTrunk(ProbeTrunk):
    """torchvision ResNet without `fc`; see the module docstring for probe shapes.

    x: (B, 3, H, W) -> forward (B, out_dim), out_dim = round(512*width)*expansion.
    """

    def __init__(self, arch: str, block: Block, depths: list[int], width: float = 1.0) -> None:
        super().__init__()
        self.arch = arch
        self.width = width
        stem = scale_channels(64, width)
        planes = [scale_channels(p, width) for p in (64, 128, 256, 512)]
        # Attribute names match torchvision so state_dict keys line up.
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem
        for i, (p, d) in enumerate(zip(planes, depths)):
            setattr(self, f"layer{i + 1}", _make_layer(block, inplanes, p, d, stride=1 if i == 0 else 2))
            inplanes = p * block.expansion

        self.layer_names = ["conv1", "layer1", "layer2", "layer3", "layer4"]
        self.layer_channels = {"conv1": stem}
        self.layer_channels.update({f"layer{i + 1}": p * block.expansion for i, p in enumerate(planes)})
        self.out_dim = inplanes
        # The conv1 probe includes the stem's max-pool (a 56x56 map at 224 px), so every
        # probe point is a module boundary of torchvision's ResNet.
        self._stage_attrs = {
            "conv1": ("conv1", "bn1", "relu", "maxpool"),
            **{f"layer{i}": (f"layer{i}",) for i in range(1, 5)},
        }
        init_weights(self)

    def _tail(self, x: Tensor) -> Tensor:
        """layer4 (B, C, h, w) -> global average pool -> (B, C)."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def resnet18(width: float = 1.0) -> ResNetTrunk:
    """ResNet-18 trunk: (B, 3, H, W) -> (B, 512*width); torchvision's architecture at width 1."""
    # Imported when a ResNet is built, not when models/ is: torchvision costs every entry
    # point's start-up (train.py --help, a bad key) about as much as torch itself.
    from torchvision.models.resnet import BasicBlock

    return ResNetTrunk("resnet18", BasicBlock, [2, 2, 2, 2], width)


def resnet50(width: float = 1.0) -> ResNetTrunk:
    """ResNet-50 trunk: (B, 3, H, W) -> (B, 2048*width); torchvision's architecture at width 1."""
    from torchvision.models.resnet import Bottleneck   # as in resnet18: only when one is built

    return ResNetTrunk("resnet50", Bottleneck, [3, 4, 6, 3], width)
