"""RotNet AlexNet trunk (Gidaris et al., ICLR 2018): conv1..conv5 probe points, FC-4096 block."""
from __future__ import annotations

from torch import Tensor, nn

from models.rotnet import Trunk, conv_bn_relu, init_weights, register, scale_channels
from rotnet.config import ConfigError, ModelConfig


def alexnet_fc_block(in_features: int, width: float = 1.0) -> nn.Sequential:
    """Fresh RotNet FC block, (Linear-BN1d-ReLU) x2: pool5 (B, C, h, w) -> (B, round(4096*width)).
    Also what the paper's non-linear conv5 probe retrains from scratch."""
    hidden = scale_channels(4096, width)
    return nn.Sequential(
        nn.Flatten(1),  # flatten (not view): pool5 output may be channels_last
        nn.Linear(in_features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
    )


def _pool5_size(input_size: int) -> int:
    """Spatial side of pool5 for a square input (6 at 224, 2 at 96, 1 at 64)."""
    side = input_size
    # conv1, pool1, pool2, pool5 as (kernel, stride, pad); conv2..conv5 keep the size
    for kernel, stride, pad in ((11, 4, 2), (3, 2, 0), (3, 2, 0), (3, 2, 0)):
        side = (side + 2 * pad - kernel) // stride + 1
    if side < 1:
        raise ConfigError(f"data.crop_size={input_size} is too small for alexnet (pool5 would be empty); "
                          "use >= 63")
    return side


@register("alexnet")
class AlexNetTrunk(Trunk):
    """RotNet AlexNet: five Conv-BN-ReLU layers, pool5, the FC block. Probe points (after each ReLU),
    224 px, width 1: conv1 (B, 64, 55, 55), conv2 (B, 192, 27, 27), conv3 (B, 384, 13, 13),
    conv4/conv5 (B, 256, 13, 13). forward: -> pool5 (B, 256, 6, 6) -> fc_block -> (B, 4096)."""

    def __init__(self, model: ModelConfig, input_size: int = 224) -> None:
        super().__init__(model, input_size)
        width = model.width
        c1, c2, c3, c4, c5 = (scale_channels(c, width) for c in (64, 192, 384, 256, 256))
        self.conv1 = conv_bn_relu(3, c1, 11, stride=4, padding=2)
        self.pool1 = nn.MaxPool2d(3, stride=2)
        self.conv2 = conv_bn_relu(c1, c2, 5, padding=2)
        self.pool2 = nn.MaxPool2d(3, stride=2)
        self.conv3 = conv_bn_relu(c2, c3, 3, padding=1)
        self.conv4 = conv_bn_relu(c3, c4, 3, padding=1)
        self.conv5 = conv_bn_relu(c4, c5, 3, padding=1)
        self.pool5 = nn.MaxPool2d(3, stride=2)
        # no adaptive pool: the FC input is fixed by input_size, the paper's 6x6x256 at 224 px
        self.fc_in_features = c5 * _pool5_size(input_size) ** 2
        self.fc_block = alexnet_fc_block(self.fc_in_features, width)

        self.layer_names = ["conv1", "conv2", "conv3", "conv4", "conv5"]
        self.layer_channels = dict(zip(self.layer_names, (c1, c2, c3, c4, c5)))
        self.out_dim = scale_channels(4096, width)
        self._stage_attrs = {"conv1": ("conv1",), "conv2": ("pool1", "conv2"), "conv3": ("pool2", "conv3"),
                             "conv4": ("conv4",), "conv5": ("conv5",)}
        init_weights(self)

    def _tail(self, x: Tensor) -> Tensor:
        """conv5 (B, C5, h, w) -> pool5 -> fc_block -> (B, out_dim)."""
        x = self.pool5(x)
        got = x.shape[1] * x.shape[2] * x.shape[3]
        if got != self.fc_in_features:
            raise ValueError(f"alexnet was built for input_size={self.input_size} (pool5 gives "
                             f"{self.fc_in_features} features) but got {got}; pass the right input_size")
        return self.fc_block(x)

