"""ResNet-18/50 trunks from torchvision's blocks, with a width multiplier.

At width 1 names and shapes are exactly torchvision's `resnet18`/`resnet50` minus `fc`; the stem and
`_make_layer` are re-done here because torchvision hard-codes 64/128/256/512 channels.
Probe points (224 px input, width 1):
    conv1  stem output, after conv1-bn1-relu-maxpool  (B, 64, 56, 56)
    layer1 (B, 64|256, 56, 56)    layer2 (B, 128|512, 28, 28)
    layer3 (B, 256|1024, 14, 14)  layer4 (B, 512|2048, 7, 7)
forward: global average pool of layer4 -> (B, 512|2048 x width).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.rotnet import Trunk, init_weights, register, scale_channels
from rotnet.config import ModelConfig

# arch -> torchvision block (by name: torchvision is imported when a ResNet is built), blocks per stage
DEPTHS: dict[str, tuple[str, list[int]]] = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2]),
    "resnet50": ("Bottleneck", [3, 4, 6, 3]),
}


def _make_layer(block: type[nn.Module], inplanes: int, planes: int, blocks: int,
                stride: int) -> nn.Sequential:
    """One ResNet stage, as torchvision builds it: (B, inplanes, H, W) -> (B, planes*exp, H/s, W/s)."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        # torchvision's conv1x1, spelt out: torchvision is imported only when a ResNet is built
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(out, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


@register("resnet18", "resnet50")
class ResNetTrunk(Trunk):
    """torchvision ResNet without `fc` (`model.arch`: a key of DEPTHS); any input size."""

    def __init__(self, model: ModelConfig, input_size: int = 224) -> None:
        super().__init__(model, input_size)
        # torchvision costs seconds of start-up: every entry point imports models, few build a ResNet
        from torchvision.models import resnet as torchvision_resnet

        name, depths = DEPTHS[model.arch]
        block = getattr(torchvision_resnet, name)
        width = model.width
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
        # conv1 includes the stem's max-pool: every probe point is a module boundary of torchvision's
        self._stage_attrs = {"conv1": ("conv1", "bn1", "relu", "maxpool"),
                             **{f"layer{i}": (f"layer{i}",) for i in range(1, 5)}}
        init_weights(self)

    def _tail(self, x: Tensor) -> Tensor:
        """layer4 (B, C, h, w) -> global average pool -> (B, C)."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

