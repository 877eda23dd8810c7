"""RotNet trunks (alexnet, resnet18, resnet50, nin) and the rotation head, built from a config.

    net = build_model(cfg, seed=cfg.train.seed)         # trunk + rotation head (models/rotnet.py)
    logits = net(x)                                     # x (B, 3, H, W) -> (B, len(cfg.data.rotations))
    feats = net.trunk.features(x, ["layer3", "layer4"])  # {"layer3": (B, C, h, w), ...}
    trunk = MODELS["nin"](cfg.model, input_size=32)      # a trunk alone (contract: models/rotnet.py)
    trunk = build_model(ckpt_cfg, seed, ckpt["model"]).trunk    # a checkpoint's trunk (eval, export)
"""
from __future__ import annotations

from models import alexnet, nin, resnet  # noqa: F401  (each adds its trunk to MODELS)
from models.rotnet import MODELS, RotNet, Trunk, build_model

__all__ = ["MODELS", "RotNet", "Trunk", "build_model"]
