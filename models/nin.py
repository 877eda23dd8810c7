"""RotNet Network-in-Network trunk for CIFAR-sized inputs (Gidaris et al., 2018).

Blocks (all Conv-BN-ReLU, conv bias off, 'same' padding), as in the RotNet code:
    block1: 5x5->192, 1x1->160, 1x1->96, max-pool 3x3/2 pad 1
    block2: 5x5->192, 1x1->192, 1x1->192, avg-pool 3x3/2 pad 1
    block3+: 3x3->192, 1x1->192, 1x1->192 (no further pooling: the authors' CIFAR configs set
    `use_avg_on_conv3: False` for 4 and 5 blocks, so blocks 3+ stay at 8x8 on 32 px inputs)
Probe `blockK` = output of block K, including its pool. Shapes at 32 px, width 1:
    block1 (B, 96, 16, 16), block2 (B, 192, 8, 8), block3/4/5 (B, 192, 8, 8).
forward: global average pool of the last block -> (B, 192*width).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.rotnet import Trunk, conv_bn_relu, init_weights, register, scale_channels
from rotnet.config import ModelConfig


@register("nin")
class NINTrunk(Trunk):
    """RotNet NIN with `model.num_blocks` in {3, 4, 5}; any input size (`input_size` is recorded only)."""

    def __init__(self, model: ModelConfig, input_size: int = 32) -> None:
        super().__init__(model, input_size)
        num_blocks = model.num_blocks   # 3, 4 or 5 (checked by ModelConfig)
        wide, mid, narrow = (scale_channels(c, model.width) for c in (192, 160, 96))
        blocks = [
            nn.Sequential(
                conv_bn_relu(3, wide, 5), conv_bn_relu(wide, mid, 1), conv_bn_relu(mid, narrow, 1),
                nn.MaxPool2d(3, stride=2, padding=1),
            ),
            nn.Sequential(
                conv_bn_relu(narrow, wide, 5), conv_bn_relu(wide, wide, 1), conv_bn_relu(wide, wide, 1),
                nn.AvgPool2d(3, stride=2, padding=1),
            ),
        ]
        for _ in range(3, num_blocks + 1):
            blocks.append(nn.Sequential(conv_bn_relu(wide, wide, 3), conv_bn_relu(wide, wide, 1),
                                        conv_bn_relu(wide, wide, 1)))
        for k, block in enumerate(blocks, start=1):
            setattr(self, f"block{k}", block)

        self.num_blocks = num_blocks
        self.layer_names = [f"block{k}" for k in range(1, num_blocks + 1)]
        self.layer_channels = {name: (narrow if name == "block1" else wide) for name in self.layer_names}
        self.out_dim = wide
        self._stage_attrs = {name: (name,) for name in self.layer_names}
        init_weights(self)

    def _tail(self, x: Tensor) -> Tensor:
        """Last block (B, C, h, w) -> global average pool -> (B, C)."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

