"""Built-in sample data: a small procedurally drawn image set in ImageNet folder layout.

    root = ensure_sample_data()   # ~/.cache/rotnet/sample-v2-seed0/{train,val}/n00000_house/*.JPEG
    python -m pipelines.sample_data [--seed N] [--out CACHE_DIR]   # prints the root: data.root=ROOT

data.root "" is the seed-0 set (`pipelines.with_data_root`, for train.py and eval.py); another seed's
set is an ordinary data.root.

Procedural: the demo runs offline, every image has an unambiguous upright (see make_image), and
the class is carried by SHAPE only (colours drawn per image), so a colour probe is at chance.
Built in a `.tmp-` folder and renamed into place once complete, so racing DDP ranks are safe.
"""
from __future__ import annotations

import argparse
import colorsys
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rotnet.atomic import make_folder

FORMAT_VERSION = 2       # bump whenever the drawing changes
CLASSES = ("house", "tree", "car", "person", "lamppost", "mountain", "tower", "boat", "fence", "table")
CLASS_DIRS = tuple(f"n{i:05d}_{c}" for i, c in enumerate(CLASSES))
PER_CLASS_TRAIN = 120
PER_CLASS_VAL = 40
GREY_EVERY = 20          # 1 in GREY_EVERY images is saved as a greyscale JPEG
MARKER = "COMPLETE.json"
SS = 2                   # supersampling factor of the drawing canvas
STALE_TMP_S = 3600       # temp folders older than this are leftovers of killed builds


def _col(r, lo=0.0, hi=1.0, sat=(0.0, 1.0)):
    h, s, v = r.random(), r.uniform(*sat), r.uniform(lo, hi)
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))


# --- class objects: (x, y) = bottom centre on the ground, s = height, c = main colour ---

def _house(d, r, x, y, s, c):
    w, bh = s * r.uniform(0.7, 1.2), s * r.uniform(0.5, 0.65)
    d.rectangle([x - w / 2, y - bh, x + w / 2, y], fill=c)
    o = w * r.uniform(0.05, 0.2)
    d.polygon([(x - w / 2 - o, y - bh), (x + w / 2 + o, y - bh), (x, y - s)], fill=_col(r))
    d.rectangle([x - w * 0.1, y - bh * 0.55, x + w * 0.1, y], fill=_col(r))
    ww, wc = w * 0.15, _col(r)
    for cx in (x - w * 0.3, x + w * 0.3):
        d.rectangle([cx - ww / 2, y - bh * 0.8, cx + ww / 2, y - bh * 0.8 + ww], fill=wc)


def _tree(d, r, x, y, s, c):
    tw, th = s * r.uniform(0.08, 0.15), s * r.uniform(0.3, 0.5)
    d.rectangle([x - tw / 2, y - th, x + tw / 2, y], fill=_col(r))
    cw = s * r.uniform(0.5, 0.8)
    if r.random() < 0.5:
        d.ellipse([x - cw / 2, y - s, x + cw / 2, y - th + (s - th) * 0.15], fill=c)
    else:                                   # pine: stacked triangles
        n = int(r.integers(2, 4))
        for k in range(n):
            lo = y - th - k * (s - th) / (n + 1) * 0.9
            d.polygon([(x - cw / 2 * (1 - 0.2 * k), lo), (x + cw / 2 * (1 - 0.2 * k), lo),
                       (x, lo - (s - th) * 0.55)], fill=c)


def _car(d, r, x, y, s, c):
    s *= r.uniform(0.55, 0.8)
    w, wr = s * r.uniform(1.8, 2.6), s * r.uniform(0.17, 0.23)
    bt, bb = y - wr - s * 0.35, y - wr * 0.6
    d.rectangle([x - w / 2, bt, x + w / 2, bb], fill=c)
    cw, off = w * r.uniform(0.45, 0.6), w * r.uniform(-0.1, 0.1)
    d.polygon([(x + off - cw / 2, bt), (x + off + cw / 2, bt), (x + off + cw * 0.35, y - s),
               (x + off - cw * 0.35, y - s)], fill=c)
    d.rectangle([x + off - cw * 0.28, y - s * 0.93, x + off + cw * 0.28, bt - s * 0.05], fill=_col(r))
    wc = _col(r, 0.0, 0.3)
    for cx in (x - w * 0.3, x + w * 0.3):
        d.ellipse([cx - wr, y - 2 * wr, cx + wr, y], fill=wc)


def _person(d, r, x, y, s, c):
    lw, hr = max(2, int(s * r.uniform(0.05, 0.08))), s * 0.1
    d.ellipse([x - hr, y - s, x + hr, y - s + 2 * hr], fill=c)
    hip, sh = y - s * 0.45, y - s + 2.6 * hr
    d.line([(x, y - s + 2 * hr), (x, hip)], fill=c, width=lw)
    for sx in (-1, 1):
        d.line([(x, hip), (x + sx * s * r.uniform(0.08, 0.2), y)], fill=c, width=lw)
        hand = (x + sx * s * r.uniform(0.15, 0.3), sh + s * r.uniform(-0.15, 0.25))
        d.line([(x, sh), hand], fill=c, width=lw)


def _lamppost(d, r, x, y, s, c):
    pw, sx = max(2.0, s * r.uniform(0.03, 0.05)), r.choice([-1, 1])
    d.rectangle([x - pw / 2, y - s, x + pw / 2, y], fill=c)
    d.polygon([(x - pw * 2, y), (x + pw * 2, y), (x + pw, y - s * 0.08), (x - pw, y - s * 0.08)], fill=c)
    a = s * r.uniform(0.18, 0.3)
    d.rectangle([min(x, x + sx * a), y - s, max(x, x + sx * a), y - s + pw], fill=c)
    lx, lh, ly = x + sx * a, s * 0.1, y - s + pw   # lamp: centre, size, top
    d.ellipse([lx - lh * 0.5, ly + lh * 0.4, lx + lh * 0.5, ly + lh * 1.1], fill=_col(r, 0.7, 1.0))
    d.polygon([(lx - lh * 0.25, ly), (lx + lh * 0.25, ly), (lx + lh * 0.6, ly + lh * 0.8),
               (lx - lh * 0.6, ly + lh * 0.8)], fill=c)


def _mountain(d, r, x, y, s, c):
    snow = _col(r, 0.8, 1.0, (0.0, 0.2))
    for k in range(int(r.integers(1, 3))):
        w, h, px = s * r.uniform(1.4, 2.4), s * r.uniform(0.6, 1.0), x + k * s * r.uniform(-0.8, 0.8)
        d.polygon([(px - w / 2, y), (px + w / 2, y), (px, y - h)], fill=c)
        f = r.uniform(0.2, 0.35)
        sy = y - h * (1 - f)                # snow line
        d.polygon([(px - w / 2 * f, sy), (px + w / 2 * f, sy), (px, y - h)], fill=snow)
        c = _col(r)


def _tower(d, r, x, y, s, c):
    w, cb = s * r.uniform(0.25, 0.4), s * 0.88
    d.rectangle([x - w / 2, y - cb, x + w / 2, y], fill=c)
    n = int(r.integers(3, 5))               # crenellations
    bw = w / (2 * n - 1)
    for k in range(n):
        d.rectangle([x - w / 2 + 2 * k * bw, y - s, x - w / 2 + (2 * k + 1) * bw, y - cb], fill=c)
    wc = _col(r)
    for k in range(int(r.integers(1, 4))):
        wy = y - cb * (0.45 + 0.2 * k)
        d.rectangle([x - w * 0.12, wy - w * 0.25, x + w * 0.12, wy], fill=wc)
    d.chord([x - w * 0.2, y - s * 0.22, x + w * 0.2, y - s * 0.04], 180, 360, fill=wc)
    d.rectangle([x - w * 0.2, y - s * 0.13, x + w * 0.2, y], fill=wc)


def _boat(d, r, x, y, s, c):
    w, hh = s * r.uniform(1.0, 1.6), s * r.uniform(0.2, 0.3)
    d.polygon([(x - w / 2, y - hh), (x + w / 2, y - hh), (x + w * 0.35, y), (x - w * 0.35, y)], fill=c)
    mw = max(2.0, s * 0.03)
    d.rectangle([x - mw / 2, y - s, x + mw / 2, y - hh], fill=_col(r))
    sx, sy, sc, wc = r.choice([-1, 1]), y - hh * 1.3, _col(r), _col(r)   # sail side, sail foot, colours
    d.polygon([(x + sx * mw, y - s), (x + sx * mw, sy), (x + sx * w * r.uniform(0.3, 0.45), sy)], fill=sc)
    for a in x - w * 0.6 + w * 0.4 * np.arange(3):   # water line over the hull bottom
        d.arc([a, y - hh * 0.4, a + w * 0.4, y + hh * 0.2], 0, 180, fill=wc, width=max(1, int(s * 0.02)))


def _fence(d, r, x, y, s, c):
    s *= r.uniform(0.4, 0.6)
    n, pw = int(r.integers(5, 11)), s * r.uniform(0.15, 0.25)
    gap = pw * r.uniform(0.4, 1.0)
    x0 = x - n * (pw + gap) / 2             # pickets with pointed tops on two rails
    for yy in (0.3, 0.7):
        d.rectangle([x0, y - s * yy - pw * 0.25, x0 + n * (pw + gap) - gap, y - s * yy + pw * 0.25], fill=c)
    for k in range(n):
        a, sh = x0 + k * (pw + gap), y - s + pw * 0.6   # picket: left edge, shoulder
        d.polygon([(a, y), (a + pw, y), (a + pw, sh), (a + pw / 2, y - s), (a, sh)], fill=c)


def _table(d, r, x, y, s, c):
    s *= r.uniform(0.5, 0.8)
    w, t, lw = s * r.uniform(1.2, 2.0), s * r.uniform(0.08, 0.14), s * r.uniform(0.06, 0.1)
    d.rectangle([x - w / 2, y - s, x + w / 2, y - s + t], fill=c)
    ins = w * r.uniform(0.03, 0.12)
    for a in (x - w / 2 + ins, x + w / 2 - ins - lw):
        d.rectangle([a, y - s + t, a + lw, y], fill=c)
    if r.random() < 0.5:                    # something standing on the table
        bw = w * r.uniform(0.1, 0.2)
        d.rectangle([x - bw / 2, y - s - bw * 1.5, x + bw / 2, y - s], fill=_col(r))


DRAW = (_house, _tree, _car, _person, _lamppost, _mountain, _tower, _boat, _fence, _table)


def _clutter(d, rng, w, h, n):
    """Isotropic distractors (blobs, rings, squiggles): no "up", no class."""
    for _ in range(n):
        x, y, r = w * rng.random(), h * rng.random(), h * rng.uniform(0.02, 0.08)
        kind = int(rng.integers(0, 3))
        if kind == 0:
            d.ellipse([x - r, y - r, x + r, y + r], fill=_col(rng))
        elif kind == 1:
            d.ellipse([x - r, y - r, x + r, y + r], outline=_col(rng), width=SS * int(rng.integers(1, 3)))
        else:
            pts = [(x + rng.normal(0, 2 * r), y + rng.normal(0, 2 * r)) for _ in range(4)]
            d.line(pts, fill=_col(rng), width=SS)


def make_image(rng: np.random.Generator, cls: int) -> Image.Image:
    """One RGB image of class `cls` (index into CLASSES), short side 72..160, aspect 0.6..1.7. Only the
    objects show "up" (a sky/ground scene would teach the horizon), so predicting the rotation needs
    the shape features that tell the classes apart: RotNet's premise."""
    short, ar = int(rng.integers(72, 161)), float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    W, H = (round(short * ar), short) if ar >= 1 else (short, round(short / ar))
    w, h = W * SS, H * SS
    # colour ramp in a random direction: a gradient, but not a "sky above ground" one
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)
    t = ((t - t.min()) / max(1e-6, float(t.max() - t.min())))[..., None]
    c0, c1 = np.array(_col(rng, 0.2, 0.9), np.float32), np.array(_col(rng, 0.2, 0.9), np.float32)
    img = Image.fromarray(((1 - t) * c0 + t * c1).astype(np.uint8))
    d = ImageDraw.Draw(img)
    _clutter(d, rng, w, h, int(rng.integers(2, 9)))
    n_obj = int(rng.integers(1, 3))
    for j in range(n_obj):
        s = h * rng.uniform(0.45, 0.8) / (1 + 0.3 * j)
        x = w * (rng.uniform(0.25, 0.75) if n_obj == 1 else rng.uniform(0.1 + 0.45 * j, 0.45 + 0.45 * j))
        y = min(h * 0.97, s + h * rng.uniform(0.1, 0.3))          # base of the object
        sw = s * rng.uniform(0.35, 0.6)                            # its shadow / patch of ground
        d.ellipse([x - sw, y - s * 0.04, x + sw, y + s * 0.05], fill=_col(rng, 0.0, 0.35))
        DRAW[cls](d, rng, x, y, s, _col(rng))
    img = img.reduce(SS)
    a = np.asarray(img, np.float32) * rng.uniform(0.75, 1.15) + rng.uniform(-20, 20)
    a += rng.normal(0, rng.uniform(2, 9), a.shape).astype(np.float32)   # sensor-like noise
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def generate(out: Path, seed: int, per_class_train: int, per_class_val: int) -> None:
    """Write the full set under `out` (no caching, no atomicity; see ensure_sample_data)."""
    for si, (split, n) in enumerate((("train", per_class_train), ("val", per_class_val))):
        for ci, cdir in enumerate(CLASS_DIRS):
            folder = Path(out) / split / cdir
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = make_image(np.random.default_rng([seed, si, ci, i]), ci)
                if (i + 7 * ci) % GREY_EVERY == GREY_EVERY // 2:
                    img = img.convert("L")
                img.save(folder / f"{cdir[:6]}_{i:05d}.JPEG", "JPEG", quality=90)


def cache_root() -> Path:
    """Where rotnet keeps generated data: $ROTNET_CACHE, else ~/.cache/rotnet."""
    return Path(os.environ.get("ROTNET_CACHE") or Path.home() / ".cache" / "rotnet").expanduser()


def ensure_sample_data(seed: int = 0, cache_dir: str | Path | None = None, *,
                       per_class_train: int = PER_CLASS_TRAIN, per_class_val: int = PER_CLASS_VAL) -> Path:
    """Root of the sample set (ROOT/{train,val}/CLASS/*.JPEG), generating it on first use."""
    base = cache_root() if cache_dir is None else Path(cache_dir).expanduser()
    make_folder(base, "ROTNET_CACHE" if os.environ.get("ROTNET_CACHE") else "the sample-data cache")
    name = f"sample-v{FORMAT_VERSION}-seed{seed}"
    if (per_class_train, per_class_val) != (PER_CLASS_TRAIN, PER_CLASS_VAL):
        name += f"-{per_class_train}x{per_class_val}"
    root = base / name
    if (root / MARKER).is_file():
        return root
    for old in base.glob(f".{name}.*"):     # leftovers of killed builds / discarded junk
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(old, ignore_errors=True)
    if root.exists() and not (root / MARKER).is_file():   # not made by us (our renames are complete)
        junk = base / f".{name}.junk-{os.getpid()}-{time.time_ns()}"
        with contextlib.suppress(OSError):
            os.rename(root, junk)
        shutil.rmtree(junk, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=base))
    try:
        generate(tmp, seed, per_class_train, per_class_val)
        meta = {"version": FORMAT_VERSION, "seed": seed, "classes": list(CLASS_DIRS),
                "per_class_train": per_class_train, "per_class_val": per_class_val}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, root)
        except OSError:                     # another process won the race
            if not (root / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv=None):
    p = argparse.ArgumentParser(description="Create (or find) the built-in sample data set.")
    p.add_argument("--seed", type=int, default=0,
                   help="another seed draws another set of the same classes (data.root \"\" is seed 0); "
                        "train on it with data.root=ROOT, the first line printed")
    p.add_argument("--out", default=None, help="cache dir (default $ROTNET_CACHE or ~/.cache/rotnet)")
    a, t0 = p.parse_args(argv), time.time()
    root = ensure_sample_data(a.seed, a.out)
    n = {sp: sum(1 for _ in (root / sp).glob("*/*.JPEG")) for sp in ("train", "val")}
    print(root)
    print(f"classes={len(CLASS_DIRS)} train={n['train']} val={n['val']} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
