"""CPU finishing stage of the DALI CPU loader: resize, flip and rotations as torch ops.

Why not in the DALI graph on CPU: measured per image (224 px, this repo's 2-core dev box),
DALI's CPU resize costs ~0.6 ms, transpose ~0.55 ms and stack ~0.6 ms, against ~0.15 ms for
torch's uint8 channels-last antialiased resize and ~0.5 ms for all four rotations done per
image in torch (each image's 150 KB stays in cache). So the CPU graph stops after the fused
decode + random crop and this module finishes the batch, in a small thread pool (torch ops
release the GIL) while DALI prefetches the next batch. On GPU everything stays in the graph.

All randomness (crop window, flip coin, one_random choice) comes from the DALI graph, so
DALI checkpoints still cover it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision.transforms.v2.functional as TF

from pipelines.rotations import rotate_hwc


def resize_hwc(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (H, W, C) -> uint8 (size, size, C), bilinear with antialias (torch's AVX uint8 path)."""
    if x.shape[0] == size and x.shape[1] == size:
        return x
    # (C, H, W) view of HWC memory = channels-last, which the fast uint8 kernel wants.
    y = TF.resize(x.permute(2, 0, 1), [size, size], antialias=True)
    return y.permute(1, 2, 0)


def rotations_into(dst: torch.Tensor, x: torch.Tensor, flip: bool, rotations: list[int]) -> None:
    """dst uint8 (K, H, W, C) <- rotations[r] of flipW^flip(x), x uint8 (H, W, C), H == W.

    Multiples of 90 are copies of transposed/flipped views (one transpose shared by 90/270):
      rot0 = x', rot90 = flipH(t'), rot180 = flipH(flipW(x')), rot270 = flipW(t'),
    with x' = flipW^flip(x), t' = transpose(x') -- equal to torch.rot90(x', k, (0, 1)).
    """
    xf = x.flip(1) if flip else x
    t = xf.transpose(0, 1).contiguous() if any(a % 180 == 90 for a in rotations) else None
    for r, a in enumerate(rotations):
        if a == 0:
            dst[r].copy_(xf)
        elif a == 90:
            dst[r].copy_(t.flip(0))
        elif a == 180:
            dst[r].copy_(xf.flip((0, 1)))
        elif a == 270:
            dst[r].copy_(t.flip(1))
        else:
            dst[r].copy_(rotate_hwc(xf, a))


class HostFinisher:
    """Finishes a batch of DALI crops: (crops, flips, rot_idx) -> uint8 tensor on CPU.

    mode "all": (N, K, S, S, C); "one_random": (N, S, S, C) rotated by rotations[rot_idx[i]];
    "none": (N, S, S, C). S = crop size. Crops may be ragged (imagenet train recipe).
    """

    def __init__(self, crop: int, rotations: list[int], mode: str, threads: int):
        self.crop, self.rotations, self.mode = crop, rotations, mode
        self.threads = max(1, threads)
        # Each image is small: torch's intra-op (OpenMP) parallelism only adds spinning threads
        # that fight DALI's for the cores (measured 2-3x slower). The setting is per thread.
        self._pool = ThreadPoolExecutor(self.threads, initializer=torch.set_num_threads, initargs=(1,))

    def _work(self, out, crops, flips, rot_idx, lo, hi):
        for i in range(lo, hi):
            x = resize_hwc(crops[i], self.crop)
            if self.mode == "all":
                rotations_into(out[i], x, bool(flips[i]), self.rotations)
            elif self.mode == "one_random":
                rotations_into(out[i:i + 1], x, bool(flips[i]), [self.rotations[rot_idx[i]]])
            else:
                out[i].copy_(x.flip(1) if flips[i] else x)

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
