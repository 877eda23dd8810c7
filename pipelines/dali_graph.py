"""The recipe as DALI runs it: the graph (read -> decode+crop -> flip -> rotations -> [normalise]), the
OpenCV finisher that completes the CPU graph, and which DALI errors are a bad file. pipelines/recipe.py
is the reference both are tested against.

One `@pipeline_def` serves every loader; `mode` picks the output per sample:
  "all"        uint8 (K, H, W, C) -- the K rotations of one crop stacked (float16 when normalising
               in the graph); the loader reshapes (N, K, ...) -> (K*N, ...).
  "one_random" one rotation per sample, (H, W, C), plus its label (index into `rotations`).
  "class"      the unrotated crop, (H, W, C), plus the class label (class loader).
Crops are always square (crop x crop), so rotations of one crop stack.

Rotations by multiples of 90 are exact pixel permutations built from one transpose and flips,
with the random horizontal flip folded into those flips (no extra copy):
  x' = flipW^c(x), t = transpose(x) (layout re-labelled HWC)
  rot0(x')   = flip(x, h=c)          rot180(x') = flip(x, h=1-c, v=1)
  rot90(x')  = flip(t, v=1-c)        rot270(x') = flip(t, h=1, v=c)
which matches `torch.rot90(x', k, dims=(0, 1))` (counter-clockwise). Odd multiples of 45 use
fn.rotate (bilinear, keep_size, corners 0); fn.rotate also matches torch.rot90 at multiples
of 90 (checked in the tests), so one_random uses it with a per-sample angle.
Flips and transposes run on uint8 (the CPU fn.flip has no float16); normalisation is last.

CPU finisher: DALI's CPU resize/transpose/stack are slow (docs/pipelines.md, "DALI on CPU"), so the CPU
graph (stage "host") stops after decode + crop and `CpuFinisher` resizes, flips and rotates the crops
with OpenCV. All randomness still comes from the graph, so DALI checkpoints cover it.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
import torchvision.transforms.v2.functional as TF
from nvidia.dali import pipeline_def

from pipelines.recipe import rotate_hwc


def _flip(x, h, v):
    return fn.flip(x, horizontal=h, vertical=v)


def _decode_crop(jpegs, *, recipe, train, crop, resize, min_scale, dec, mixed_args, final_resize=True):
    """Encoded bytes -> uint8 (crop, crop, 3) RGB crop per the recipe (no flip yet).

    final_resize=False (CPU "host" stage) leaves the imagenet-train random crop at its own
    size (ragged); `CpuFinisher` resizes it.
    """
    if recipe == "imagenet" and train:
        # Fused decode + random-resized-crop: only the crop window's DCT blocks are decoded,
        # several times cheaper on CPU than decoding the full image and cropping after.
        img = fn.decoders.image_random_crop(
            jpegs, device=dec, output_type=types.RGB, adjust_orientation=True, random_area=[min_scale, 1.0],
            random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0], num_attempts=10, **mixed_args)
        if not final_resize:
            return img
        return fn.resize(img, resize_x=crop, resize_y=crop, interp_type=types.INTERP_LINEAR,
                         antialias=True)
    # adjust_orientation (DALI's default, stated): EXIF-turned JPEGs upright, as pipelines.recipe decodes
    img = fn.decoders.image(jpegs, device=dec, output_type=types.RGB, adjust_orientation=True, **mixed_args)
    if recipe == "imagenet":  # eval: shorter side -> resize, centre crop
        img = fn.resize(img, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True,
                        subpixel_scale=False)
        return fn.crop(img, crop=(crop, crop), out_of_bounds_policy="pad", fill_values=0)
    if recipe == "cifar":
        if not train:  # no augmentation; the crop only guarantees a square crop x crop output
            return fn.crop(img, crop=(crop, crop), out_of_bounds_policy="pad", fill_values=0)
        # pad 4 then a random crop: centre-crop a (crop+8) window with zero padding, then pick
        # one of the 9 x 9 integer offsets (discrete positions: anchor = pos * 8 is an integer).
        padded = fn.crop(img, crop=(crop + 8, crop + 8), out_of_bounds_policy="pad", fill_values=0)
        pos = [i / 8.0 for i in range(9)]
        return fn.crop(padded, crop=(crop, crop), crop_pos_x=fn.random.uniform(values=pos),
                       crop_pos_y=fn.random.uniform(values=pos))
    raise ValueError(f"data.recipe={recipe!r}; expected 'imagenet' or 'cifar'")


def _rotations_all(x, c, rotations):
    """K uint8 (H, W, C) outputs, rotations[r] of flipW^c(x), in `rotations` order."""
    need_t = any(a % 180 == 90 for a in rotations)
    t = fn.transpose(x, perm=[1, 0, 2], output_layout="HWC") if need_t else None
    flipped = None
    outs = []
    for a in rotations:
        if a == 0:
            outs.append(_flip(x, c, 0))
        elif a == 90:
            outs.append(_flip(t, 0, 1 - c))
        elif a == 180:
            outs.append(_flip(x, 1 - c, 1))
        elif a == 270:
            outs.append(_flip(t, 1, c))
        else:  # odd multiple of 45: interpolate from the flipped crop
            if flipped is None:
                flipped = _flip(x, c, 0)
            outs.append(fn.rotate(flipped, angle=float(a), keep_size=True, fill_value=0,
                                  interp_type=types.INTERP_LINEAR))
    return outs


def _normalise(x, mean, std):
    """uint8 HWC -> float16 HWC, (x/255 - mean)/std (mean/std in 0..1 units). HWC, not CHW: the
    loader's (B, C, H, W) view of it is channels-last, what the model takes, with no copy."""
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT16, output_layout="HWC",
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])


def external_reader(source, labels=True):
    """(encoded images, int32 labels) from `source(iteration)` -> (list of uint8 arrays, (B, 1) int32):
    the reader of folders and tar shards (pipelines.dali_loader.Feed). A one-argument callable, so DALI's
    checkpoint records the iteration and a restored pipeline asks `source` from there on.
    labels=False (a graph that draws its own labels): images only and None, no output left unused."""
    if not labels:
        return fn.external_source(source=lambda i: source(i)[0], batch=True, dtype=types.UINT8), None
    return fn.external_source(source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32])


@pipeline_def(enable_checkpointing=True)
def rotation_graph(*, reader, train, recipe, crop, resize, min_scale, rotations, mode, decoder_device,
                   mixed_args, normalize, mean, std, stage="full"):
    """Returns (images, labels); see the module docstring for the per-mode shapes.

    reader(labels=...) -> (encoded images, labels or None), called inside the graph:
    `functools.partial(external_reader, feed)`. The recipe below is the same whatever reads the bytes.

    stage="host" (CPU): returns (crops, labels, flip coins, rotation choices) instead and
    leaves resize/flip/rotations to `CpuFinisher` (faster on CPU; module docstring).
    """
    jpegs, label = reader(labels=not (mode == "one_random" and stage == "full"))
    x = _decode_crop(jpegs, recipe=recipe, train=train, crop=crop, resize=resize, min_scale=min_scale,
                     dec=decoder_device, mixed_args=mixed_args, final_resize=stage == "full")
    if stage == "host":
        never = dict(probability=0.0, dtype=types.INT32)  # a per-sample 0 output
        c = fn.random.coin_flip(probability=0.5 if train else 0.0, dtype=types.INT32)
        r = (fn.random.uniform(values=list(range(len(rotations))), dtype=types.INT32)
             if mode == "one_random" else fn.random.coin_flip(**never))
        return x, label, c, r
    c = fn.random.coin_flip(probability=0.5, dtype=types.INT32) if train else 0
    if mode == "all":
        outs = _rotations_all(x, c, rotations)
        if normalize:
            outs = [_normalise(o, mean, std) for o in outs]
        return fn.stack(*outs, axis=0), label
    if mode == "one_random":
        r = fn.random.uniform(values=list(range(len(rotations))), dtype=types.INT32)
        # angle = rotations[r], looked up arithmetically (sum of masks) so label and angle agree.
        angle = sum((r == i) * float(a) for i, a in enumerate(rotations))
        y = fn.rotate(_flip(x, c, 0), angle=fn.cast(angle, dtype=types.FLOAT), keep_size=True,
                      fill_value=0, interp_type=types.INTERP_LINEAR)
        return (_normalise(y, mean, std) if normalize else y), r
    if mode == "class":
        y = _flip(x, c, 0)
        return (_normalise(y, mean, std) if normalize else y), label
    raise ValueError(f"unknown graph mode {mode!r}")


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


# cv2.rotate codes for counter-clockwise rotations (torch.rot90 convention, pipelines.recipe)
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


# Only these DALI errors mean "a file is not a decodable image": a decoder naming the sample it
# could not decode, or nvImageCodec's code-stream statuses (3 bad, 4 unsupported, 13/14 the same
# from an extension, 19 incomplete). Memory and CUDA errors are never the file's fault.
_CODESTREAM_STATUSES = ("3", "4", "13", "14", "19")
_DECODE_FAILURE = re.compile(r"Failed to decode sample #|nvImageCodec failure: '#(?:"
                             + "|".join(_CODESTREAM_STATUSES) + ")'")
_NOT_THE_FILE = re.compile(r"out of memory|CUDA error|cudaError|CUDA_ERROR", re.IGNORECASE)
# nvImageCodec statuses a sample can cause: the code-stream ones; 2 ("invalid parameter"), what DALI
# says when every sample of a batch declares a 0 width or height; 17 (an extension's internal error),
# what its PNG and WebP parsers say on some files. A bug can say 2 or 17 too: only a sample that fails
# alone is blamed, else the error is raised as it is.
_SAMPLE_STATUSES = {"2", "17", *_CODESTREAM_STATUSES}


def is_decode_failure(message: str) -> bool:
    """Whether DALI's `message` says a file could not be decoded (even when no file is found to blame)."""
    return bool(_DECODE_FAILURE.search(message)) and not _NOT_THE_FILE.search(message)


def may_be_a_file(message: str) -> bool:
    """Whether DALI's `message` may be one sample's fault, to be found by decoding the samples alone: not
    memory or CUDA, and no nvImageCodec status but a sample's. A codec's own words ("Invalid
    sample_type: 8197" for a 32-bit TIFF) carry no status: only decoding the samples alone tells."""
    statuses = re.findall(r"nvImageCodec failure: '#(\d+)'", message)
    return not _NOT_THE_FILE.search(message) and all(s in _SAMPLE_STATUSES for s in statuses)


def decoder_said(message: str) -> str:
    """The line of a DALI error that says what went wrong: the first after "encountered:", else the last."""
    head, found, tail = message.partition("encountered:")
    lines = tail.strip().splitlines()[:1] if found else head.strip().splitlines()[-1:]
    return lines[0].strip() if lines else "no reason given"
