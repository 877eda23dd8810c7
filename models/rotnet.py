"""The RotNet network: a trunk from the registry plus a separate rotation head.

Checkpoints store this module's state dict, so keys are `trunk.*` and `head.*`;
eval.py and visualize.py use only the trunk of `seeded_rotnet(ckpt config, seed, ckpt["model"])`.
"""
from __future__ import annotations

import torch
from torch import nn


class RotNet(nn.Module):
    """x: (B, 3, H, W) -> rotation logits (B, K), K = number of rotations in the set."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def build_rotnet(model_cfg, num_rotations: int, input_size: int) -> RotNet:
    """Trunk `model_cfg.arch` at `model_cfg.width` (NIN: `num_blocks`) plus a K-way rotation head."""
    from models import build_rotation_head, build_trunk  # registry lives in models/__init__.py

    trunk = build_trunk(model_cfg.arch, width=model_cfg.width, num_blocks=model_cfg.num_blocks,
                        input_size=input_size)
    return RotNet(trunk, build_rotation_head(trunk, num_rotations))


def seeded_rotnet(cfg, seed: int, state: dict | None = None) -> RotNet:
    """The RotNet a run config describes (cfg.model, cfg.data.rotations, cfg.data.crop_size).

    Initialised under torch.manual_seed(seed): the same weights on every rank and every rerun.
    state: a checkpoint's 'model' dict, loaded strictly over that init.
    """
    torch.manual_seed(seed)
    net = build_rotnet(cfg.model, num_rotations=len(cfg.data.rotations), input_size=cfg.data.crop_size)
    if state is not None:
        net.load_state_dict(state, strict=True)
    return net
