"""The RotNet network: a trunk (the contract every trunk in `models/` follows, and the helpers they
share), the rotation head, RotNet = trunk + head, and `build_model`, which makes one from a config.

    trunk = MODELS[cfg.model.arch](cfg.model, input_size)   # every trunk: (ModelConfig, square side)
    trunk.arch, trunk.width  registry name and width multiplier it was built with
    trunk.input_size       square side it is built for (alexnet sizes its FC block from it)
    trunk.layer_names      probe points, shallow -> deep
    trunk.layer_channels   {probe name: channels}
    trunk.out_dim          size of `forward(x)`, the rotation head's input
    trunk.features(x, layers) -> {name: (B, C, h, w)}   runs only as deep as needed
    trunk(x)               -> (B, out_dim)
    net = RotNet(trunk, RotationHead(trunk.out_dim, K))      # x (B, 3, S, S) -> (B, K) rotation logits

Checkpoints store RotNet's state dict, so keys are `trunk.*` and `head.*`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from rotnet.checkpoint import CheckpointError
from rotnet.config import Config, ModelConfig


def scale_channels(channels: int, width: float) -> int:
    """Width-multiplied channel count: max(1, round(channels * width)); width > 0 (ModelConfig checks)."""
    return max(1, round(channels * width))


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, padding: int | None = None):
    """Conv (no bias) -> BN -> ReLU, 'same' padding unless given: (B, cin, H, W) -> (B, cout, H', W')."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def init_weights(module: nn.Module) -> None:
    """torchvision's ResNet init in place: conv kaiming-normal (fan_out), norms 1, 0; Linear default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Trunk(nn.Module):
    """Base class: a trunk is an ordered list of stages, each ending at a probe point.

    Subclasses set `layer_names`, `layer_channels`, `out_dim`, `_stage_attrs` ({probe name: attributes
    run from the previous probe point to this one}) and `_tail`. Plain attributes, not a ModuleDict,
    keep state_dict keys readable (and torchvision's for ResNet).
    """

    arch: str
    width: float
    input_size: int
    layer_names: list[str]
    layer_channels: dict[str, int]
    out_dim: int
    _stage_attrs: dict[str, tuple[str, ...]]

    def __init__(self, model: ModelConfig, input_size: int) -> None:
        super().__init__()
        self.arch, self.width, self.input_size = model.arch, model.width, input_size

    def features(self, x: Tensor, layers: Iterable[str] | str) -> dict[str, Tensor]:
        """x: (B, 3, H, W) -> {name: (B, layer_channels[name], h, w)} for `layers` (a str: one), in the
        order asked; runs only up to the deepest one."""
        wanted = [layers] if isinstance(layers, str) else list(layers)
        bad = [name for name in wanted if name not in self.layer_names]
        if bad or not wanted:
            raise ValueError(f"{self.arch}.features: unknown layer(s) {bad or '(none)'}; "
                             f"valid layers: {self.layer_names}")
        deepest = max(self.layer_names.index(name) for name in wanted)
        found: dict[str, Tensor] = {}
        for name in self.layer_names[: deepest + 1]:
            for attr in self._stage_attrs[name]:
                x = getattr(self, attr)(x)
            found[name] = x
        return {name: found[name] for name in wanted}

    def _tail(self, x: Tensor) -> Tensor:
        """Deepest probe feature (B, C, h, w) -> rotation-head input (B, out_dim)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) -> (B, out_dim), the features the rotation head classifies."""
        last = self.layer_names[-1]
        return self._tail(self.features(x, [last])[last])


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


# model.arch -> trunk class, built as cls(cfg.model, input_size): x (B, 3, S, S) -> (B, out_dim).
# Each trunk module adds itself (`register`), as torchvision's models do, so that `build_model` can sit
# beside RotNet: models/__init__.py imports every trunk module. model.arch's choices (rotnet/config.py)
# name the same keys; a test holds the two together.
MODELS: dict[str, type[Trunk]] = {}


def register(*archs: str):
    """Class decorator: MODELS[arch] = the trunk class, for each of `archs`."""
    def add(cls: type[Trunk]) -> type[Trunk]:
        for arch in archs:
            MODELS[arch] = cls
        return cls
    return add


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
