"""Model registry: RotNet trunks (alexnet, resnet18, resnet50, nin) and the rotation head.

    trunk = build_trunk("resnet50", width=1.0)
    head = build_rotation_head(trunk, num_rotations=4)
    logits = head(trunk(x))                        # x (B, 3, H, W) -> (B, 4)
    feats = trunk.features(x, ["layer3", "layer4"])  # {"layer3": (B, C, h, w), ...}

Every trunk has `layer_names`, `layer_channels`, `out_dim`, `forward`, `features`
(see `models.trunk.ProbeTrunk`).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.alexnet import AlexNetTrunk, alexnet, alexnet_fc_block
from models.heads import RotationHead
from models.nin import NINTrunk, nin
from models.resnet import ResNetTrunk, resnet18, resnet50
from models.trunk import ProbeTrunk

MODELS: dict[str, Callable[..., ProbeTrunk]] = {
    "alexnet": alexnet,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "nin": nin,
}


def build_trunk(arch: str, width: float = 1.0, num_blocks: int = 4, *, input_size: int = 224) -> ProbeTrunk:
    """Build a trunk by registry name; x: (B, 3, H, W) -> (B, trunk.out_dim).

    `num_blocks` is used by nin only; `input_size` (square side the FC block is sized
    for) by alexnet only. Unknown `arch` raises ValueError listing the valid names.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {sorted(MODELS)}")
    if arch == "nin":
        return MODELS[arch](width=width, num_blocks=num_blocks)
    if arch == "alexnet":
        return MODELS[arch](width=width, input_size=input_size)
    return MODELS[arch](width=width)


def build_rotation_head(trunk: ProbeTrunk, num_rotations: int) -> nn.Module:
    """Linear head on the trunk's output: (B, trunk.out_dim) -> (B, num_rotations)."""
    return RotationHead(trunk.out_dim, num_rotations)


__all__ = [
    "MODELS", "build_trunk", "build_rotation_head", "ProbeTrunk", "RotationHead",
    "AlexNetTrunk", "ResNetTrunk", "NINTrunk", "alexnet", "alexnet_fc_block", "resnet18", "resnet50", "nin",
]
