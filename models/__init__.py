"""RotNet trunks (alexnet, resnet18, resnet50, nin) and the rotation head, built from a config.

    net = build_model(cfg, seed=cfg.train.seed)         # trunk + rotation head (models/rotnet.py)
    logits = net(x)                                     # x (B, 3, H, W) -> (B, len(cfg.data.rotations))
    feats = net.trunk.features(x, ["layer3", "layer4"])  # {"layer3": (B, C, h, w), ...}
    trunk = MODELS["nin"](cfg.model, input_size=32)      # a trunk alone (contract: models/rotnet.py)
    trunk = build_model(ckpt_cfg, seed, ckpt["model"]).trunk    # a checkpoint's trunk (eval, export)
"""
from __future__ import annotations

import torch

from models.alexnet import AlexNetTrunk
from models.nin import NINTrunk
from models.resnet import ResNetTrunk
from models.rotnet import RotationHead, RotNet, Trunk
from rotnet.checkpoint import CheckpointError
from rotnet.config import Config

__all__ = ["MODELS", "RotNet", "Trunk", "build_model"]

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
