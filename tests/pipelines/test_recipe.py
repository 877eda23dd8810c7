"""The reference recipe (pipelines/recipe.py): its CIFAR fast path, the DALI graph form of it, and
pixel-exact rotations and label order of every backend/variant and rotation set against it; its decoder
on damaged files, against DALI's."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import build_class_loader, build_rotation_loader
from pipelines.recipe import crop_batch, decode_rgb, image_problem, rotate_hwc
from tests.pipelines.images import (
    cfg,
    corrupt_jpeg,
    encoded,
    make_folder,
    needs_dali,
    png_chunk_flipped,
    png_with_chunk,
    png_written,
    textured,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cifar_gather_equals_per_image_path(seed):
    """The one-gather fast path (stacked crop-sized images) = pad 4, crop, flip image by image."""
    d = cfg(recipe="cifar", crop_size=8).data
    x = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    fast = crop_batch(x, d, True, torch.Generator().manual_seed(seed))
    slow = crop_batch(list(x), d, True, torch.Generator().manual_seed(seed))
    assert fast.shape == (6, 8, 8, 3) and torch.equal(fast, slow)
    g = torch.Generator().manual_seed(seed)  # the draws, in the recipe's order: flips, then offsets
    flip, off = torch.rand(6, generator=g) < 0.5, torch.randint(0, 9, (6, 2), generator=g)
    padded = torch.nn.functional.pad(x, (0, 0, 4, 4, 4, 4))
    for i in range(6):
        dy, dx = off[i].tolist()
        crop = padded[i, dy:dy + 8, dx:dx + 8]
        assert torch.equal(fast[i], crop.flip(1) if flip[i] else crop)


@needs_dali
@pytest.mark.parametrize("recipe", ["imagenet", "cifar"])
@pytest.mark.parametrize("size", [(40, 52), (33, 45), (45, 33), (37, 37)])
def test_dali_eval_crops_equal_torch_recipe(tmp_path, recipe, size):
    """Eval recipe: the DALI graph and the torch recipe agree to one grey level (resize rounding
    and centre offsets included), on shrinking, enlarging and odd sizes."""
    root = make_folder(tmp_path / "train", [2, 2], size=size)
    out = {}
    for backend in ("dali", "torch"):
        lo = build_class_loader(cfg(backend=backend, recipe=recipe, resize_size=36), root, batch_size=4,
                                train=False,
                                seed=0)
        out[backend] = next(iter(lo))[0].float()
    assert (out["dali"] - out["torch"]).abs().max() <= 1


CPU = torch.device("cpu")
# (name, config overrides): dali_rotate_in_graph exercises the GPU graph's rotations on CPU.
VARIANTS = [pytest.param(("dali", dict(backend="dali")), id="dali", marks=needs_dali),
            pytest.param(("dali-graph", dict(backend="dali")), id="dali-graph", marks=needs_dali),
            pytest.param(("torch", dict(backend="torch")), id="torch"),
            pytest.param(("resident", dict(backend="torch", resident=True)), id="resident")]
SETS = [[0, 90, 180, 270], [0, 180], [90, 270], [0, 45, 90, 135, 180, 225, 270, 315]]


def data_for(variant, **kw):
    name, over = variant
    return cfg(**over, **kw, dali_rotate_in_graph=name == "dali-graph")


def first_batch(loader):
    return next(iter(loader))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rotations", SETS, ids=["4", "0-180", "90-270", "8"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_rotations_are_rot90_of_own_crop(square_split, variant, rotations, train):
    if train and len(rotations) == 8 and variant[0] != "dali":
        pytest.skip("8-set covered once per recipe is enough")
    d = data_for(variant, rotations=rotations)
    loader = build_rotation_loader(d, square_split, batch_size=3, train=train, seed=1)
    x, y = first_batch(loader)
    k, n = len(rotations), 3
    assert x.shape == (k * n, 32, 32, 3) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == list(range(k)) * n  # sample-major, label r
    base = rotations[0]
    for i in range(n):
        ref = x[k * i]  # rotation rotations[0] of original i
        for r, a in enumerate(rotations):
            if (a - base) % 90 == 0:
                expect = torch.rot90(ref, (a - base) // 90, dims=(0, 1))
                assert torch.equal(x[k * i + r], expect), (variant[0], a)
            else:  # odd multiple of 45: interpolated from the unrotated crop; implementations differ slightly
                approx = rotate_hwc(ref, a).float()
                inner = slice(8, 24)  # away from the zero-filled corners
                diff = (x[k * i + r].float() - approx)[inner, inner].abs().mean()
                assert diff < 12, (variant[0], a, float(diff))


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_random_matches_class_crop(square_split, variant):
    """one_random: K*N originals per step; each output = its own crop rotated by rotations[label]."""
    rotations = [0, 90, 180, 270]
    d = data_for(variant, rotations=rotations, rotation_mode="one_random")
    rot = build_rotation_loader(d, square_split, batch_size=2, train=False, seed=3)
    cls = build_class_loader(data_for(variant), square_split, batch_size=8, train=False, seed=3)
    x, y = first_batch(rot)
    plain, _ = first_batch(cls)
    assert x.shape == (8, 32, 32, 3) and y.shape == (8,)
    assert 0 <= int(y.min()) and int(y.max()) < 4
    for i in range(8):
        assert torch.equal(x[i], torch.rot90(plain[i], int(y[i]), dims=(0, 1)))
    assert len(rot) == 2  # validation: 15 images = 8 + 7 originals (last step partial)


def test_rotate_hwc_direction():
    """rotate_hwc(., 90) is torch.rot90 k=1 (counter-clockwise): top-right pixel goes top-left."""
    img = torch.zeros(4, 4, 3, dtype=torch.uint8)
    img[0, 3] = 255
    assert rotate_hwc(img, 90)[0, 0, 0] == 255
    assert torch.equal(rotate_hwc(img, 270), torch.rot90(img, 3, (0, 1)))


def dali_cpu_decode(data: bytes) -> np.ndarray | None:
    """uint8 (H, W, 3) as DALI's CPU decoder (training's, off the GPU) decodes `data`, in the scan's
    pipeline; None if it fails."""
    from pipelines.scan import _dali_decoder

    pipe = _dali_decoder(workers=1)
    pipe.feed_input("encoded", [np.frombuffer(data, np.uint8)])
    try:
        return np.asarray(pipe.run()[0].at(0))
    except RuntimeError:
        return None


@needs_dali
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_a_jpeg_decodes_as_dali_decodes_it_turned_as_its_exif_says(mode, orientation, progressive):
    """DALI's pixels bit for bit, for every EXIF orientation (the label depends on it). A turned CMYK
    JPEG is the odd one: DALI gives OpenCV's pixels for it, 1 level off libjpeg-turbo's."""
    rgb = textured(np.random.default_rng(3), 64, 96)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    data = encoded(rgb, "JPEG", mode, quality=90, progressive=progressive, exif=exif.tobytes())
    assert np.array_equal(decode_rgb("x.JPEG", data=data).permute(1, 2, 0).numpy(), dali_cpu_decode(data))


@needs_dali
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGB-exif6"])
@pytest.mark.parametrize("at", [60, 400])
def test_a_jpeg_with_corrupt_data_decodes_as_dali_decodes_it(tmp_path, mode, at):
    """torchvision stops at corrupt JPEG image data that DALI's decoder reads past (libjpeg-turbo warns):
    decode_rgb reads on too, to DALI's pixels, turned as the EXIF orientation says."""
    rgb = np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    extra = {"exif": exif.tobytes()} if mode == "RGB-exif6" else {}
    data = corrupt_jpeg(encoded(rgb, "JPEG", mode[:4].rstrip("-"), quality=90, **extra), at=at)
    (tmp_path / "x.JPEG").write_bytes(data)
    want = dali_cpu_decode(data)
    assert want is not None
    assert np.array_equal(decode_rgb(str(tmp_path / "x.JPEG")).permute(1, 2, 0).numpy(), want)


@needs_dali
def test_jpegs_damaged_at_random_get_dali_s_verdict_and_pixels(tmp_path):
    """Seeded damage (bytes changed in the header or the image data, a block of data cut out, a stray
    marker) to JPEGs:
    decode_rgb refuses exactly the ones DALI's CPU decoder refuses, and gives DALI's pixels for the rest."""
    rng = np.random.default_rng(11)
    source = encoded(textured(rng, 72, 96), "JPEG", quality=90)
    sos = source.index(b"\xff\xda")
    refused = 0
    for k in range(45):
        b = bytearray(source)
        if k % 3 == 0:
            for _ in range(rng.integers(1, 6)):
                b[int(rng.integers(sos + 10, len(b) - 2))] = int(rng.integers(0, 256))
        elif k % 3 == 1:
            for _ in range(rng.integers(1, 4)):
                b[int(rng.integers(2, sos + 10))] = int(rng.integers(0, 256))
        elif k % 4:
            at = int(rng.integers(sos + 10, len(b) - 200))
            del b[at:at + int(rng.integers(1, 200))]
        else:   # a stray marker in the data: torchvision stops, DALI reads on
            b = bytearray(corrupt_jpeg(source, at=int(rng.integers(20, len(b) - sos - 20))))
        path = tmp_path / f"{k}.JPEG"
        path.write_bytes(bytes(b))
        want = dali_cpu_decode(bytes(b))
        if want is None:
            refused += 1
            assert image_problem(str(path)), k
        else:
            assert np.array_equal(decode_rgb(str(path)).permute(1, 2, 0).numpy(), want), k
    assert 0 < refused < 45   # both kinds of verdict were tried


@needs_dali
@pytest.mark.parametrize("fmt", ["WEBP", "WEBP-lossless", "TIFF-lzw", "TIFF-jpeg", "BMP", "JPEG2000"])
def test_other_formats_damaged_at_random_get_dali_s_verdict_and_pixels(tmp_path, fmt):
    """Seeded damage (cut short, bytes changed, bytes added at the end; the first bytes too, but where a
    TIFF keeps its tags there):
    decode_rgb refuses what DALI's CPU decoder refuses and gives its pixels for the rest. Where PIL stops
    at damaged data (an LZW TIFF) DALI falls back to OpenCV, and so does decode_rgb."""
    rng = np.random.default_rng(21)
    name, _, option = fmt.partition("-")
    save = {"lossless": {"lossless": True}, "lzw": {"compression": "tiff_lzw"},
            "jpeg": {"compression": "jpeg"}, "": {}}[option]
    source = encoded(textured(rng, 48, 64), name, **save)
    kinds = (0, 1, 3) if fmt == "TIFF-jpeg" else (0, 1, 2, 3)   # PIL reads TIFF tags that libtiff refuses
    for k in range(16):
        b, kind = bytearray(source), kinds[k % len(kinds)]
        if kind == 0:
            b = b[:int(rng.integers(len(b) // 4, len(b) - 1))]
        elif kind == 1:
            for _ in range(rng.integers(1, 6)):
                b[int(rng.integers(len(b) // 3, len(b)))] = int(rng.integers(0, 256))
        elif kind == 2:
            for _ in range(rng.integers(1, 4)):
                b[int(rng.integers(8, min(len(b), 200)))] = int(rng.integers(0, 256))
        else:
            b += bytes(rng.integers(0, 256, 50, dtype=np.uint8))
        path = tmp_path / f"{k}.img"
        path.write_bytes(bytes(b))
        want = dali_cpu_decode(bytes(b))
        if want is None:
            assert image_problem(str(path)), k
        else:
            assert np.array_equal(decode_rgb(str(path)).permute(1, 2, 0).numpy(), want), k


@needs_dali
@pytest.mark.parametrize("magic, maxval", [("P6", 1), ("P6", 55), ("P6", 255), ("P6", 65535), ("P5", 55),
                                           ("P5", 65535), ("P3", 55), ("P2", 1000), ("P1", 1), ("P4", 1)])
def test_a_pnm_decodes_as_dali_decodes_it(tmp_path, magic, maxval):
    """PNMs go through OpenCV: DALI's pixels, whatever the maxval (PIL scales binary samples by a maxval
    other than 255 or 65535, DALI does not); a maxval between 256 and 65534 stays within 1 of DALI."""
    rng = np.random.default_rng(8)
    h, w, c = 6, 8, 3 if magic in ("P3", "P6") else 1
    v = rng.integers(0, maxval + 1, (h, w, c))
    head = f"{magic}\n{w} {h}\n" + (f"{maxval}\n" if magic not in ("P1", "P4") else "")
    if magic in ("P1", "P2", "P3"):                                  # ASCII samples
        body = " ".join(map(str, v.ravel())).encode()
    elif magic == "P4":                                              # one bit a sample, rows padded
        body = np.packbits(v[..., 0].astype(np.uint8), axis=1).tobytes()
    else:
        body = v.astype(">u2" if maxval > 255 else "u1").tobytes()
    data = head.encode() + body + b"\n"
    (tmp_path / "x.pnm").write_bytes(data)
    want = dali_cpu_decode(data)
    got = decode_rgb(str(tmp_path / "x.pnm")).permute(1, 2, 0).numpy()
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= (255 < maxval < 65535)


@needs_dali
@pytest.mark.parametrize("variant", ["rgb", "rgba", "grey", "grey-alpha", "palette", "palette-trns", "1-bit",
                                     "grey16", "rgb16", "rgba16", "exif6", "text-crc"])
def test_a_png_decodes_as_dali_decodes_it(tmp_path, variant):
    """PNGs go through OpenCV: DALI's pixels bit for bit, 16-bit samples rounded as DALI rounds them,
    turned as an eXIf orientation says; a text chunk failing its CRC is skipped as DALI skips it."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, (30, 44, 4), dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = {"rgb": lambda: encoded(rgb, "PNG"), "rgba": lambda: png_written(np.dstack([rgb, rgb[..., :1]])),
            "grey": lambda: encoded(rgb[..., 0], "PNG"), "grey-alpha": lambda: png_written(rgb[..., :2]),
            "palette": lambda: encoded(rgb, "PNG", "P"),
            "palette-trns": lambda: encoded(rgb, "PNG", "P", transparency=3),
            "1-bit": lambda: encoded(rgb[..., 0], "PNG", "1"), "grey16": lambda: png_written(deep[..., 0]),
            "rgb16": lambda: png_written(deep[..., :3]), "rgba16": lambda: png_written(deep),
            "exif6": lambda: encoded(rgb, "PNG", exif=exif.tobytes()),
            "text-crc": lambda: png_with_chunk(encoded(rgb, "PNG"), b"tEXt", b"note\x00hi", crc=0)}[variant]()
    (tmp_path / "x.png").write_bytes(data)
    want = dali_cpu_decode(data)
    assert want is not None
    assert np.array_equal(decode_rgb(str(tmp_path / "x.png")).permute(1, 2, 0).numpy(), want)


def test_a_png_with_damaged_image_data_is_refused_not_a_crash(tmp_path):
    """torchvision's PNG decoder crashes the process (SIGSEGV) on damaged image data, whether the CRC
    says so or not (an invalid row filter under right CRCs); the torch backends' decoder refuses such a
    file in words. In a child process, so that a crash fails this test, not the test run."""
    pixels = np.random.default_rng(6).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    (tmp_path / "crc.png").write_bytes(png_chunk_flipped(encoded(pixels, "PNG"), b"IDAT"))
    (tmp_path / "filter.png").write_bytes(png_written(pixels, filter_byte=7))
    code = ("from pipelines.recipe import image_problem\n"
            f"for name in ('crc.png', 'filter.png'): print(image_problem({str(tmp_path)!r} + '/' + name))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.splitlines() == ["a PNG whose image data cannot be decoded"] * 2
