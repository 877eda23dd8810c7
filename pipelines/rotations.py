"""Rotation sets and the rotations in torch (torch backend, resident mode, tests).

Convention (all backends): `a` degrees = `torch.rot90(img_hwc, a // 90, dims=(0, 1))`, counter-
clockwise as displayed; odd multiples of 45 rotate bilinearly about the centre, corners 0.
Mode "all" batches are sample-major: row K*i + r is original i rotated by rotations[r], label r.
"""
from __future__ import annotations

import torch

from rotnet.cli import InputError

ROTATION_MODES = ("all", "one_random")


def check_rotations(rotations, mode: str = "all") -> list[int]:
    """Validated rotation list (degrees, multiples of 45 in [0, 360), no duplicates)."""
    rots = [int(r) for r in rotations]
    if not rots:
        raise InputError("data.rotations is empty")
    bad = [r for r in rots if r % 45 or not 0 <= r < 360]
    if bad:
        raise InputError(f"data.rotations: {bad} are not multiples of 45 in [0, 360)")
    if len(set(rots)) != len(rots):
        raise InputError(f"data.rotations has duplicates: {rots}")
    if mode not in ROTATION_MODES:
        raise InputError(f"data.rotation_mode={mode!r}; expected one of {ROTATION_MODES}")
    return rots


def rotate_hwc(img: torch.Tensor, angle: int) -> torch.Tensor:
    """Rotate uint8 (..., H, W, C) images, H == W, by `angle` degrees (multiple of 45)."""
    if angle % 90 == 0:
        return torch.rot90(img, angle // 90, dims=(-3, -2))
    # Imported here: torchvision costs every entry point's start-up about as much as torch.
    import torchvision.transforms.v2.functional as TF

    chw = img.movedim(-1, -3)  # (..., C, H, W) view: torchvision rotates CHW
    out = TF.rotate(chw, float(angle), interpolation=TF.InterpolationMode.BILINEAR, expand=False, fill=0)
    return out.movedim(-3, -1).contiguous()


def rotate_batch(x: torch.Tensor, rotations: list[int], mode: str, g: torch.Generator):
    """uint8 (P, S, S, C) -> "all": ((P, K, S, S, C), None); "one_random": (x_i by rotations[r_i], r (P,))."""
    if mode == "all":
        return torch.stack([rotate_hwc(x, a) for a in rotations], dim=1), None
    r = torch.randint(0, len(rotations), (x.shape[0],), generator=g)
    out = torch.empty_like(x)
    for j, a in enumerate(rotations):  # one batched op per angle
        sel = to_device((r == j).nonzero().flatten(), x.device)
        if len(sel):
            out[sel] = rotate_hwc(x[sel], a)
    return out, r


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a host sync (on CUDA: async copy from pinned memory)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def rotation_labels(k: int, n: int, device=None) -> torch.Tensor:
    """int64 (K*N,) labels of a sample-major batch: [0, 1, .., K-1] repeated N times."""
    return torch.arange(k, device=device, dtype=torch.int64).repeat(n)
