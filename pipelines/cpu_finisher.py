"""CPU finishing stage of the DALI CPU loader: resize, flip and rotations of DALI's crops.

DALI's CPU resize/transpose/stack are slow (docs/pipelines.md, "DALI on CPU"), so the CPU graph stops
after decode + crop. All randomness still comes from the graph, so DALI checkpoints cover it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from pipelines.rotations import rotate_hwc


def resize_hwc(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (H, W, C) -> (size, size, C) bilinear, antialiased where it shrinks (enlarging: OpenCV)."""
    h, w = x.shape[0], x.shape[1]
    if h == size and w == size:
        return x
    if h <= size and w <= size:
        return torch.from_numpy(cv2.resize(np.ascontiguousarray(x.numpy()), (size, size),
                                           interpolation=cv2.INTER_LINEAR))
    # (C, H, W) view of HWC memory = channels-last, which the fast uint8 kernel wants.
    y = TF.resize(x.permute(2, 0, 1), [size, size], antialias=True)
    return y.permute(1, 2, 0)


# cv2.rotate codes for counter-clockwise rotations (torch.rot90 convention, pipelines.rotations)
_CV_ROTATE = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}


def rotations_into(dst: torch.Tensor, x: torch.Tensor, flip: bool, rotations: list[int]) -> None:
    """dst uint8 (K, H, W, C), contiguous CPU <- rotations[r] of x' = flipW^flip(x); x (H, W, C), H == W.
    x' goes into the 0-degree slot if any, each other slot is one cv2.rotate of it (45s: torch)."""
    d, xn = dst.numpy(), np.ascontiguousarray(x.numpy())
    j = rotations.index(0) if 0 in rotations else None
    base = d[j] if j is not None else np.empty_like(xn)
    if flip:
        cv2.flip(xn, 1, dst=base)
    else:
        np.copyto(base, xn)
    for r, a in enumerate(rotations):
        if r == j:
            continue
        if a in _CV_ROTATE:
            cv2.rotate(base, _CV_ROTATE[a], dst=d[r])
        else:
            d[r] = rotate_hwc(torch.from_numpy(base), a).numpy()


class CpuFinisher:
    """(crops, flips, rot_idx) -> uint8 on CPU: mode "all" (N, K, S, S, C); "one_random" (N, S, S, C)
    rotated by rotations[rot_idx[i]]; "class" (N, S, S, C). Crops may be ragged (imagenet train)."""

    def __init__(self, crop: int, rotations: list[int], mode: str, threads: int):
        self.crop, self.rotations, self.mode, self.threads = crop, rotations, mode, max(1, threads)
        # Small images: intra-op threads (torch per thread, OpenCV process-wide) only fight DALI's.
        self._pool = ThreadPoolExecutor(self.threads, initializer=torch.set_num_threads, initargs=(1,))
        cv2.setNumThreads(1)

    def _work(self, out, crops, flips, rot_idx, lo, hi):
        for i in range(lo, hi):
            x = resize_hwc(crops[i], self.crop)
            if self.mode == "all":
                rotations_into(out[i], x, bool(flips[i]), self.rotations)
            else:   # one slot: its rotation (one_random) or the flipped crop alone (class)
                angle = self.rotations[rot_idx[i]] if self.mode == "one_random" else 0
                rotations_into(out[i:i + 1], x, bool(flips[i]), [angle])

    def __call__(self, crops: list[torch.Tensor], flips: list[int], rot_idx: list[int]) -> torch.Tensor:
        n, s, c = len(crops), self.crop, crops[0].shape[-1]
        shape = (n, len(self.rotations), s, s, c) if self.mode == "all" else (n, s, s, c)
        out = torch.empty(shape, dtype=torch.uint8)
        bounds = [n * j // self.threads for j in range(self.threads + 1)]
        for f in [self._pool.submit(self._work, out, crops, flips, rot_idx, lo, hi)
                  for lo, hi in zip(bounds, bounds[1:])]:
            f.result()
        return out
