"""The reference recipe in torch ops: decode, crop, flip, rotations. The torch backend, resident images
and visualize.py run it; pipelines/dali_graph.py is the same recipe as a DALI graph (GPU) and as a
graph plus an OpenCV finisher (CPU), both tested against this file (tests/pipelines/test_recipe.py).

  imagenet  train: random-resized-crop (area [min_scale, 1], ratio [3/4, 4/3]) + flip;
            eval: resize the shorter side to resize_size, centre crop crop_size.
  cifar     train: zero-pad 4, random crop_size crop (9 x 9 positions) + flip; eval: centre crop.
Rotations (all backends): `a` degrees = `torch.rot90(img_hwc, a // 90, dims=(0, 1))`, counter-
clockwise as displayed; odd multiples of 45 rotate bilinearly about the centre, corners 0.
Mode "all" batches are sample-major: row K*i + r is original i rotated by rotations[r], label r.
A batch's generator draws flips, crop windows, then one_random's rotations.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image

from pipelines.batch import JPEG_MAGIC, PNG_MAGIC, PNM_MAGIC, by_rule, check_recipe, jpeg_frame
from pipelines.listing import BadImageError

# Decoders by the first bytes: torchvision for JPEG; OpenCV for PNG (torchvision's PNG decoder crashes
# the process on damaged image data) and PNM (PIL scales by a maxval other than 255 or 65535, DALI does
# not); PIL for the rest that DALI and the scan read: BMP, TIFF, JPEG 2000, and WebP, whose EXIF
# orientation torchvision ignores.
_OPENCV_FIRST = (PNG_MAGIC, *PNM_MAGIC)


def decode_rgb(path: str, data: bytes | None = None) -> torch.Tensor:
    """File `path` (or its bytes `data`, e.g. a shard member) -> uint8 (3, H, W) RGB, upright as its EXIF
    orientation says (as DALI's decoders turn it: here the orientation is the label). 16-bit samples are
    rounded to 8 bits as DALI's decoder rounds them. BadImageError also for the files DALI refuses (the
    scan's rules), so that every backend trains on the same files."""
    img, problem = _attempt(path, data)
    if problem:
        raise BadImageError(f"bad image file {path!r}: {problem}. {repair_advice(data is not None)}")
    return img


def image_problem(path: str) -> str:
    """'' when `decode_rgb` decodes the file `path`, else why not: the scan's verdict without DALI, where
    training decodes with this file too."""
    return _attempt(path, None)[1]


def _attempt(path: str, data: bytes | None) -> tuple[torch.Tensor | None, str]:
    """(uint8 (3, H, W), '') or (None, why the file is refused)."""
    try:
        encoded = Path(path).read_bytes() if data is None else data
        problem = by_rule(encoded)   # a GIF, a JPEG or PNG cut short, a 0 width or height
        img, problem = (None, problem) if problem else _decode(encoded)
    except Exception as e:  # torchvision and PIL raise RuntimeError / ValueError / OSError for bad data
        return None, f"{type(e).__name__}: {e}"
    if problem:
        return None, problem
    if img.dtype == torch.uint16:   # round(v * 255 / 65535), never a tie
        img = ((img.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return img.contiguous(), ""


def _decode(encoded: bytes) -> tuple[torch.Tensor | None, str]:
    """(uint8 or uint16 (3, H, W), '') or (None, why DALI's decoder cannot decode it either). Where
    torchvision or PIL stops at damaged data that DALI's CPU decoder reads on (libjpeg-turbo goes on;
    for a TIFF DALI falls back to OpenCV), OpenCV decodes it, to DALI's pixels (test_recipe.py)."""
    if encoded.startswith(_OPENCV_FIRST):   # OpenCV's verdicts and pixels are DALI's (uint16: 16-bit)
        img = _opencv(encoded, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
        kind = "PNG" if encoded.startswith(PNG_MAGIC) else "PNM"
        return (img, "") if img is not None else (None, f"a {kind} whose image data cannot be decoded")
    try:
        return _codec(encoded)
    except (RuntimeError, OSError, SyntaxError, ValueError):   # torchvision's and PIL's words for bad data
        img = _opencv(encoded, cv2.IMREAD_COLOR)
        if img is None:
            raise
        return img, ""


def _codec(encoded: bytes) -> tuple[torch.Tensor | None, str]:
    """`_decode` without the fallback: torchvision for a JPEG, PIL for the rest."""
    if encoded.startswith(JPEG_MAGIC):
        if _turned_cmyk(encoded) and (img := _opencv(encoded, cv2.IMREAD_COLOR)) is not None:
            return img, ""
        raw = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        return decode_image(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True), ""
    with Image.open(io.BytesIO(encoded)) as opened:
        problem = samples_problem(opened)
        if problem:
            return None, problem
        im = ImageOps.exif_transpose(opened)
        if im.mode == "P" and opened.format == "TIFF":   # 16-bit colour map, rounded as DALI rounds samples
            cmap = np.array(opened.tag_v2[320], dtype=np.uint16).reshape(3, -1)
            pixels = cmap[:, np.array(im)].transpose(1, 2, 0)
        elif im.mode == "F":   # float TIFF samples, converted as DALI converts them: v x 255 rounded, clamped
            v = np.nan_to_num(np.array(im, dtype=np.float32), nan=0.0)
            pixels = np.clip(np.floor(v * np.float32(255) + np.float32(0.5)), 0, 255).astype(np.uint8)
        elif im.mode.startswith("I;16"):   # 16-bit TIFF: PIL's RGB would clip the samples at 255
            pixels = np.array(im, dtype=np.uint16)
        else:
            pixels = np.array(im.convert("RGB"))
    img = torch.from_numpy(pixels)
    return (img.expand(3, *img.shape) if img.ndim == 2 else img.permute(2, 0, 1)), ""


def samples_problem(im) -> str:
    """Why DALI's decoder cannot decode `im` (opened by PIL) although DALI reads its format, else '': a
    TIFF of signed or 32-bit integer samples, which PIL opens as mode "I" (DALI: "Invalid sample_type"),
    or one without a BitsPerSample tag (1-bit, as PIL writes it). 16-bit and float TIFFs decode in both."""
    if im.format == "TIFF" and im.mode == "I":
        return ("a TIFF of signed or 32-bit integer samples, which DALI's decoder (training's) cannot "
                "decode: convert it to 8 or 16-bit unsigned")
    if im.format == "TIFF" and 258 not in im.tag_v2:
        return ("a TIFF without a BitsPerSample tag, which DALI's decoder (training's) cannot read: save "
                "it again as PNG or JPEG")
    return ""


def _turned_cmyk(encoded: bytes) -> bool:
    """A 4-component (CMYK) JPEG with an EXIF orientation other than 1: DALI's CPU decoder gives OpenCV's
    pixels for it, and libjpeg-turbo's (torchvision's, 1 level off OpenCV's) for one it need not turn."""
    sof = jpeg_frame(encoded)
    if sof < 0 or len(encoded) <= sof + 9 or encoded[sof + 9] != 4:
        return False
    with Image.open(io.BytesIO(encoded)) as im:
        return im.getexif().get(0x0112, 1) != 1


def _opencv(encoded: bytes, flags: int) -> torch.Tensor | None:
    """(3, H, W) RGB as OpenCV decodes `encoded` (EXIF orientation applied), None when it cannot."""
    bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), flags)
    return None if bgr is None else torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)


def repair_advice(shards: bool) -> str:
    """What to do about an undecodable image, for a folder or for tar shards."""
    scan = "Run `python -m pipelines.scan SPLIT_DIR --out LIST`"
    if shards:
        return (f"{scan} on the folder the shards were packed from, then repack it: `python -m "
                "pipelines.pack_shards SPLIT_DIR --file-list LIST --out NEW_DIR`.")
    return f"{scan} and set data.file_list to the list it writes."


def rrc_window(h: int, w: int, min_scale: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop window (top, left, height, width), area in [min_scale, 1], ratio [3/4, 4/3]."""
    log_r = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        u = torch.rand(3, generator=g).tolist()
        target = h * w * (min_scale + (1.0 - min_scale) * u[0])
        ratio = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    side = min(h, w)  # fallback: centre square (as torchvision does for extreme ratios)
    return (h - side) // 2, (w - side) // 2, side, side


def _resize(img: torch.Tensor, size: list[int]) -> torch.Tensor:
    """uint8 (C, H, W), antialiased bilinear; on GPU in float (the uint8 antialiased kernel is CPU-only)."""
    if img.is_cuda:
        return TF.resize(img.float(), size, antialias=True).round_().clamp_(0, 255).byte()
    return TF.resize(img, size, antialias=True)


def eval_crop(img: torch.Tensor, data) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, S, S), the deterministic eval recipe, rounded as the DALI graph rounds:
    the resized longer side to nearest, the crop offset half up (torchvision: down, half to even)."""
    s = data.crop_size
    if data.recipe == "imagenet":  # shorter side -> resize_size
        h, w = img.shape[-2:]
        r = data.resize_size / min(h, w)
        img = _resize(img, [round(h * r), round(w * r)])
    h, w = img.shape[-2:]
    if h < s or w < s:  # zero padding around a smaller image
        img = TF.center_crop(img, [max(h, s), max(w, s)])
        h, w = img.shape[-2:]
    top, left = (h - s + 1) // 2, (w - s + 1) // 2
    return img[:, top:top + s, left:left + s]


def crop_batch(images, data, train: bool, g: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (P, H, W, C) tensor or list of (H, W, C) images -> uint8 (P, S, S, C) crops, flips included."""
    check_recipe(data)
    chw = [im.permute(2, 0, 1) for im in images]  # views: torchvision works on (C, H, W)
    if not train:
        return torch.stack([eval_crop(im, data).permute(1, 2, 0) for im in chw])
    s, n = data.crop_size, len(chw)
    flip = torch.rand(n, generator=g) < 0.5
    if data.recipe == "cifar":
        off = torch.randint(0, 9, (n, 2), generator=g)  # top-left of the crop in the 4-padded image
        if torch.is_tensor(images) and tuple(images.shape[1:3]) == (s, s):
            return _cifar_gather(images, off, flip)
        crops = [TF.center_crop(im, [s + 8, s + 8])[:, dy:dy + s, dx:dx + s]
                 for im, (dy, dx) in zip(chw, off.tolist())]
    else:
        crops = []
        for im in chw:
            top, left, ch, cw = rrc_window(im.shape[1], im.shape[2], data.min_scale, g)
            crops.append(_resize(im[:, top:top + ch, left:left + cw], [s, s]))
    return torch.stack([(c.flip(-1) if f else c).permute(1, 2, 0) for c, f in zip(crops, flip.tolist())])


def _cifar_gather(x: torch.Tensor, off: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """crop_batch's cifar train path for crop-sized (P, S, S, C) as ONE gather: pad, crop, flip."""
    n, s, dev = x.shape[0], x.shape[1], x.device
    pad = F.pad(x, (0, 0, 4, 4, 4, 4))                    # (P, S+8, S+8, C), zeros
    ar = torch.arange(s)
    rows = off[:, :1] + ar                                  # (P, S)
    cols = torch.where(flip[:, None], off[:, 1:] + s - 1 - ar, off[:, 1:] + ar)
    return pad[torch.arange(n, device=dev)[:, None, None], pinned_copy(rows, dev)[:, :, None],
               pinned_copy(cols, dev)[:, None, :]]


def rotate_hwc(img: torch.Tensor, angle: int) -> torch.Tensor:
    """Rotate uint8 (..., H, W, C) images, H == W, by `angle` degrees (multiple of 45)."""
    if angle % 90 == 0:
        return torch.rot90(img, angle // 90, dims=(-3, -2))
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
        sel = pinned_copy((r == j).nonzero().flatten(), x.device)
        if len(sel):
            out[sel] = rotate_hwc(x[sel], a)
    return out, r


def pinned_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (indices) on `device` without a host sync: on CUDA an async copy from pinned
    memory, elsewhere `.to`."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def make_batch(spec, key: tuple[int, int], images, labels: torch.Tensor, cropped: bool = False):
    """One step's batch: crops (unless `cropped`), then rotations; random by (key=(epoch, step), rank).
    -> (uint8 (P, K, S, S, C), None) "all"; ((P, S, S, C), rotation index) one_random; (.., labels) class."""
    g = torch.Generator().manual_seed(spec.seed_for("batch", *key, spec.rank))
    x = images if cropped else crop_batch(images, spec.data, spec.train, g)
    if spec.mode == "class":
        return x, labels
    return rotate_batch(x, spec.rotations, spec.mode, g)
