"""Rotation-prediction head. (Evaluation probe heads live with the eval code.)"""
from __future__ import annotations

from torch import Tensor, nn


class RotationHead(nn.Module):
    """Linear rotation classifier: (B, in_dim) -> (B, num_rotations) (AlexNet's FC block is the trunk's)."""

    def __init__(self, in_dim: int, num_rotations: int) -> None:
        super().__init__()
        if in_dim < 1 or num_rotations < 2:
            raise ValueError(f"RotationHead needs in_dim >= 1 and num_rotations >= 2, got {in_dim}, "
                             f"{num_rotations}")
        self.fc = nn.Linear(in_dim, num_rotations)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)
