"""Where normalisation happens, and the trainer-side `prepare_batch`.

Loaders emit uint8 (B, H, W, C) (CPU, or loader.normalize="trainer"; `prepare_batch` normalises)
or float16 (B, C, H, W) normalised in the graph (GPU with "graph"/"auto"), channels-last in memory.
"""
from __future__ import annotations

import functools

import torch

NORMALIZE_MODES = ("auto", "graph", "trainer")


def normalize_in_graph(mode: str, device: torch.device) -> bool:
    """True when the loader itself should emit normalised float16 (B, C, H, W), channels-last."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"loader.normalize={mode!r}; expected one of {NORMALIZE_MODES}")
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return mode == "graph"


@functools.cache
def _stats(mean: tuple, std: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) float32 (1, C, 1, 1) so that x*scale + shift == (x/255 - mean)/std."""
    mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(device)
    return scale, (-mean / std).view(1, -1, 1, 1).to(device)


def prepare_batch(images: torch.Tensor, data, channels_last: bool,
                  dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Loader images -> model input (B, C, H, W) in `dtype`, on the images' device: uint8 (B, H, W, C)
    -> (x/255 - mean)/std in float32; a float (B, C, H, W) batch is only cast (dtype=None: kept as is,
    for autocast). channels_last costs no copy for either."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if images.is_floating_point():
        if images.dim() != 4 or images.shape[1] != len(data.mean):
            raise ValueError(f"expected float (B, C, H, W), got shape {tuple(images.shape)}")
        return images.to(dtype or images.dtype).contiguous(memory_format=fmt)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 (B, H, W, C), got {images.dtype} {tuple(images.shape)}")
    scale, shift = _stats(tuple(data.mean), tuple(data.std), str(images.device))
    x = images.permute(0, 3, 1, 2).float()  # keeps the NHWC strides, i.e. channels_last
    x = torch.addcmul(shift, x, scale)       # one fused pass: x*scale + shift
    return x.to(dtype or torch.float32).contiguous(memory_format=fmt)
