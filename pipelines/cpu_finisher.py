"""CPU finishing stage of the DALI CPU loader: resize, flip and rotations of DALI's crops.

On CPU, DALI's resize, transpose and stack each cost about twice its fused decode + random crop
(measured per 224-px image; the figures are in docs/pipelines.md, "DALI on CPU"). So the CPU
graph stops after decode + crop and this module finishes the batch with the fastest uint8
kernels at hand (resize: OpenCV when enlarging, torch when shrinking; flips and rotations:
OpenCV's blocked SIMD transposes), per image in a small thread pool (both release the GIL)
while DALI prefetches the next batch. All randomness (crop window, flip coin, one_random
choice) comes from the graph, so DALI checkpoints still cover it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from pipelines.rotations import rotate_hwc


def resize_hwc(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (H, W, C) -> uint8 (size, size, C), bilinear; antialiased where it shrinks.

    Enlarging on both axes (most random-resized crops of small images): OpenCV INTER_LINEAR,
    ~0.11 ms vs ~0.28 ms for torch's, and the same filter -- antialiasing only changes a
    bilinear filter when it shrinks. Otherwise torch's AVX uint8 antialiased kernel.
    """
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
    """dst uint8 (K, H, W, C) <- rotations[r] of x' = flipW^flip(x); x uint8 (H, W, C), H == W.

    x' is written once (into the 0-degree slot when there is one) and each other slot is one
    OpenCV rotate of it; equal to torch.rot90(x', a // 90, (0, 1)). dst must be contiguous CPU
    memory (a fresh batch tensor is); odd multiples of 45 go through torch (pipelines.rotations).
    """
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
    """Finishes a batch of DALI crops: (crops, flips, rot_idx) -> uint8 tensor on CPU.

    mode "all": (N, K, S, S, C); "one_random": (N, S, S, C) rotated by rotations[rot_idx[i]];
    "class": (N, S, S, C). S = crop size. Crops may be ragged (imagenet train recipe).
    """

    def __init__(self, crop: int, rotations: list[int], mode: str, threads: int):
        self.crop, self.rotations, self.mode = crop, rotations, mode
        self.threads = max(1, threads)
        # Each image is small: torch's intra-op (OpenMP) parallelism only adds spinning threads
        # that fight DALI's for the cores (measured 2-3x slower). The setting is per thread.
        self._pool = ThreadPoolExecutor(self.threads, initializer=torch.set_num_threads, initargs=(1,))
        # Same for OpenCV's own pool (cv2.resize splits even small images); process-wide setting.
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
        n, s = len(crops), self.crop
        c = crops[0].shape[-1]
        shape = (n, len(self.rotations), s, s, c) if self.mode == "all" else (n, s, s, c)
        out = torch.empty(shape, dtype=torch.uint8)
        bounds = [n * j // self.threads for j in range(self.threads + 1)]
        futures = [self._pool.submit(self._work, out, crops, flips, rot_idx, bounds[j], bounds[j + 1])
                   for j in range(self.threads)]
        for f in futures:
            f.result()
        return out
