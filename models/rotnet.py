"""The RotNet network, built from a config: a trunk (models/trunk.py; the registry `MODELS` below) and
the rotation head.

    net = build_model(cfg, seed=cfg.train.seed)         # x (B, 3, H, W) -> (B, len(cfg.data.rotations))
    net = RotNet(trunk, RotationHead(trunk.out_dim, K))      # x (B, 3, S, S) -> (B, K) rotation logits
    trunk = build_model(ckpt_cfg, seed, ckpt["model"]).trunk    # a checkpoint's trunk (eval, export)

Checkpoints store RotNet's state dict, so keys are `trunk.*` and `head.*`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.alexnet import AlexNetTrunk
from models.nin import NINTrunk
from models.resnet import ResNetTrunk
from models.trunk import Trunk
from rotnet.checkpoint import CheckpointError
from rotnet.config import Config


class RotationHead(nn.Module):
    """Linear rotation classifier: (B, in_dim) -> (B, num_rotations) (AlexNet's FC block is the trunk's).
    Evaluation probe heads live with the eval code (probes/heads.py)."""

    def __init__(self, in_dim: int, num_rotations: int) -> None:
        super().__init__()
        if in_dim < 1 or num_rotations < 2:
            raise ValueError(f"RotationHead needs in_dim >= 1 and num_rotations >= 2, got {in_dim}, "
                             f"{num_rotations}")
        self.fc = nn.Linear(in_dim, num_rotations)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class RotNet(nn.Module):
    """x: (B, 3, H, W) -> rotation logits (B, K), K = number of rotations in the set."""

    def __init__(self, trunk: Trunk, head: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


# model.arch -> trunk class, built as cls(cfg.model, input_size): x (B, 3, S, S) -> (B, out_dim)
MODELS: dict[str, type[Trunk]] = {"alexnet": AlexNetTrunk, "resnet18": ResNetTrunk,
                                  "resnet50": ResNetTrunk, "nin": NINTrunk}


def build_model(cfg: Config, seed: int, state: dict | None = None, source: str = "checkpoint") -> RotNet:
    """The RotNet `cfg` describes, initialised under manual_seed(seed) (same on every rank). state: a
    checkpoint's 'model', loaded strictly; CheckpointError naming `source` when it does not fit."""
    torch.manual_seed(seed)
    trunk = MODELS[cfg.model.arch](cfg.model, cfg.data.crop_size)
    net = RotNet(trunk, RotationHead(trunk.out_dim, len(cfg.data.rotations)))
    if state is not None:
        want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        wrong = sorted(k for k in want.keys() | state.keys()
                       if k not in want or k not in state or tuple(state[k].shape) != want[k])
        if wrong:
            raise CheckpointError(f"{source}: weights do not match its config (model.arch={cfg.model.arch}, "
                                  f"width={cfg.model.width}, data.crop_size={cfg.data.crop_size}) at "
                                  f"{len(wrong)} keys, e.g. {wrong[:3]}")
        net.load_state_dict(state, strict=True)
    return net
