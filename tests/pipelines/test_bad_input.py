"""ImageNet's odd files: greyscale, CMYK, PNG named .JPEG, non-square decode to RGB; bad files are named."""
import functools
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.batch
from pipelines import BadImageError, build_class_loader, build_rotation_loader
from pipelines.scan import main as scan_main
from tests.pipelines.images import (
    HAVE_DALI,
    KINDS,
    cfg,
    corrupt_jpeg,
    declaring,
    encoded,
    int32_tiff,
    lossless_webp,
    make_folder,
    needs_dali,
    png_with_chunk,
    save_jpeg,
    textured,
)

CPU = torch.device("cpu")


def odd_split(root):
    """c0: greyscale, CMYK, PNG-as-.JPEG, non-square (tall + wide); c1: plain; + a non-image file."""
    rng = np.random.default_rng(0)
    c0 = os.path.join(root, "c0")
    save_jpeg(os.path.join(c0, "grey.JPEG"), textured(rng, 40, 40)[..., 0])
    os.makedirs(c0, exist_ok=True)
    Image.fromarray(textured(rng, 40, 40)).convert("CMYK").save(os.path.join(c0, "cmyk.JPEG"), "JPEG")
    Image.fromarray(textured(rng, 40, 40)).save(os.path.join(c0, "png named.JPEG"), "PNG")
    save_jpeg(os.path.join(c0, "tall.JPEG"), textured(rng, 64, 33))
    save_jpeg(os.path.join(c0, "wide.jpg"), textured(rng, 30, 70))
    save_jpeg(os.path.join(root, "c1", "plain.jpeg"), textured(rng, 40, 40))
    with open(os.path.join(c0, "notes.txt"), "w") as f:
        f.write("not an image; skipped by the listing")
    return str(root)


def add_bad(root):
    """A truncated JPEG and a non-image with an image extension."""
    good = os.path.join(root, "c1", "plain.jpeg")
    data = open(good, "rb").read()
    with open(os.path.join(root, "c1", "truncated.JPEG"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(root, "c0", "garbage.JPEG"), "wb") as f:
        f.write(b"<html>this is not a JPEG</html>" * 10)


def make_cfg(kind, **kw):
    name, over = kind
    return cfg(resize_size=36, **over, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_odd_files_decode_to_rgb(tmp_path, kind, train):
    root = odd_split(tmp_path / "train")
    lo = build_class_loader(make_cfg(kind), root, batch_size=6, train=train, seed=0)
    assert lo.num_samples == 6  # notes.txt skipped
    x, y = next(iter(lo))
    assert x.shape == (6, 32, 32, 3) and x.dtype == torch.uint8
    assert sorted(y.tolist()) == [0, 0, 0, 0, 0, 1]
    rot = build_rotation_loader(make_cfg(kind), root, batch_size=6, train=train, seed=0)
    assert next(iter(rot))[0].shape == (24, 32, 32, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_every_backend_decodes_bmp_tiff_pnm_and_16_bits_as_the_8_bit_png(tmp_path, kind):
    """The listing takes BMP, TIFF and PNM, as DALI and the scan do; torchvision decodes none of them, so
    the torch backends read them through PIL. 16-bit PNG, TIFF and PNM round to 8 bits as DALI rounds
    them, and float TIFF samples and 16-bit TIFF colour maps convert as DALI converts them.
    Every lossless copy gives its 8-bit PNG's batch row, bit for bit, in every backend."""
    image = Image.fromarray(textured(np.random.default_rng(1), 40, 40))
    deep = np.random.default_rng(2).integers(0, 65536, (40, 40)).astype(np.uint16)
    c0 = tmp_path / "train" / "c0"
    c0.mkdir(parents=True)
    for name in ("a.png", "b.bmp", "c.tif", "d.ppm"):
        image.save(c0 / name)
    image.convert("L").save(c0 / "e.pgm")                          # greyscale PNM (P5)
    image.convert("L").convert("RGB").save(c0 / "f.png")
    for name in ("g.png", "h.tif"):
        Image.fromarray(deep).save(c0 / name)                       # 16-bit greyscale
    Image.fromarray(np.round(deep / 257).astype(np.uint8)).save(c0 / "i.png")
    (c0 / "j.pgm").write_bytes(b"P5\n40 40\n65535\n" + deep.astype(">u2").tobytes())   # 16-bit PNM
    deep3 = np.stack([deep, deep[::-1], deep[:, ::-1]], axis=2)
    (c0 / "k.ppm").write_bytes(b"P6\n40 40\n65535\n" + deep3.astype(">u2").tobytes())
    Image.fromarray(np.round(deep3 / 257).astype(np.uint8)).save(c0 / "l.png")
    floats = np.random.default_rng(3).normal(0.5, 0.4, (40, 40)).astype(np.float32)   # some out of [0, 1]
    Image.fromarray(floats).save(c0 / "m.tif")                      # DALI: round(v x 255), clamped
    Image.fromarray(np.clip(np.floor(floats * np.float32(255) + np.float32(0.5)), 0, 255).astype(np.uint8)
                    ).save(c0 / "n.png")
    image.convert("P").save(c0 / "o.tif")                           # a 16-bit colour map (PIL: 256 x c)
    with Image.open(c0 / "o.tif") as pal:
        cmap = (np.array(pal.tag_v2[320], np.int64).reshape(3, -1) * 255 + 32767) // 65535
        Image.fromarray(cmap[:, np.array(pal)].transpose(1, 2, 0).astype(np.uint8)).save(c0 / "p.png")
    lo = build_class_loader(make_cfg(kind), str(tmp_path / "train"), batch_size=16, train=False, seed=0)
    (x, _), = list(lo)
    assert x.dtype == torch.uint8
    rows = dict(zip(sorted(os.listdir(c0)), x))    # eval loaders keep the listing's order
    for name, same_as in [("b.bmp", "a.png"), ("c.tif", "a.png"), ("d.ppm", "a.png"), ("e.pgm", "f.png"),
                          ("g.png", "i.png"), ("h.tif", "i.png"), ("j.pgm", "i.png"),
                          ("k.ppm", "l.png"), ("m.tif", "n.png"), ("o.tif", "p.png")]:
        assert torch.equal(rows[name], rows[same_as]), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("orientation, side", [(3, "bottom"), (6, "right"), (8, "left")])
@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tif"])
def test_every_backend_turns_an_image_upright_as_its_exif_says(tmp_path, kind, orientation, side, ext):
    """An image stored turned, with an EXIF orientation, is shown upright by viewers and by DALI's
    decoders (JPEG, PNG, WebP, TIFF); the torch backends turn it too. Here the orientation is the label:
    the backends must agree."""
    stored = np.zeros((48, 48, 3), np.uint8)
    stored[:12, :, 0] = 255                                         # a red band along the stored top
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "train" / "c0").mkdir(parents=True)
    Image.fromarray(stored).save(tmp_path / "train" / "c0" / f"turned.{ext}", exif=exif.tobytes(), quality=95)
    lo = build_class_loader(make_cfg(kind), str(tmp_path / "train"), batch_size=1, train=False, seed=0)
    (x, _), = list(lo)
    red = x[0, ..., 0].float()                                      # (32, 32): resized to 36, centre crop
    edges = {"top": red[:5], "bottom": red[-5:], "left": red[:, :5], "right": red[:, -5:]}
    means = {k: round(float(v.mean())) for k, v in edges.items()}
    assert means[side] > 200 and means["top"] < 60, means


@pytest.mark.parametrize("kind", KINDS)
def test_non_image_file_is_named(tmp_path, kind):
    root = odd_split(tmp_path / "train")
    with open(os.path.join(root, "c0", "garbage.JPEG"), "wb") as f:
        f.write(b"<html>this is not a JPEG</html>" * 10)
    with pytest.raises(BadImageError, match=r"garbage\.JPEG(.|\n)*pipelines\.scan"):
        lo = build_class_loader(make_cfg(kind), root, batch_size=7, train=False, seed=0)
        list(lo)



@pytest.mark.parametrize("kind", KINDS)
def test_every_backend_refuses_what_dali_refuses_naming_the_file(tmp_path, kind):
    """The files DALI refuses (a GIF named .JPEG, which torchvision reads; TIFFs of signed integer samples
    or without BitsPerSample, which PIL reads; a JPEG or a PNG cut short, which torchvision reads; a lossless
    WebP DALI misreads, DALI's error an internal one that names no file) stop every backend in one line naming
    the file, so that no backend trains on a file another one refuses, and the scan's list suits them all."""
    rng = np.random.default_rng(3)
    bad = {"gif.JPEG": lambda p: Image.fromarray(textured(rng, 40, 40)).save(p, "GIF"),
           "int16.tif": lambda p: Image.fromarray(rng.integers(-999, 999, (40, 40)).astype(np.int16)).save(p),
           "cut.JPEG": lambda p: p.write_bytes(open(good, "rb").read()[:600]),
           "onebit.tif": lambda p: Image.fromarray(textured(rng, 40, 40)).convert("1").save(p),
           "cut.png": lambda p: p.write_bytes(encoded(textured(rng, 40, 40), "PNG")[:-12]),   # no IEND
           "odd_exif.webp": lambda p: p.write_bytes(lossless_webp(True, Image.Exif().tobytes()))}
    for name, write in bad.items():
        root = tmp_path / name / "train"
        good = root / "c0" / "good.JPEG"
        save_jpeg(str(good), textured(rng, 40, 40))
        write(root / "c0" / name)
        with pytest.raises(BadImageError, match=re.escape(str(root / "c0" / name))) as e:
            list(build_class_loader(make_cfg(kind), str(root), batch_size=2, train=False, seed=0))
        assert "\n" not in str(e.value), name

@pytest.mark.parametrize("kind", KINDS)
def test_every_backend_reads_what_dali_reads_past_damage(tmp_path, kind):
    """DALI's decoder reads on past corrupt JPEG image data (torchvision stops there) and past a PNG text
    chunk failing its CRC (PIL stops there), and ignores bytes after a PNG's IEND: every backend trains on
    such files (the torch backends' pixels are DALI's: tests/pipelines/test_recipe.py)."""
    rng = np.random.default_rng(4)
    c0 = tmp_path / "train" / "c0"
    c0.mkdir(parents=True)
    png = encoded(textured(rng, 40, 40), "PNG")
    (c0 / "corrupt.JPEG").write_bytes(corrupt_jpeg(encoded(rng.integers(0, 256, (40, 48, 3), np.uint8),
                                                           "JPEG"), at=100))
    (c0 / "text_crc.png").write_bytes(png_with_chunk(png, b"tEXt", b"note\x00hi", crc=0))
    (c0 / "trailer.png").write_bytes(png + b"bytes after IEND")
    lo = build_class_loader(make_cfg(kind), str(tmp_path / "train"), batch_size=3, train=False, seed=0)
    (x, y), = list(lo)
    assert x.shape == (3, 32, 32, 3) and y.tolist() == [0, 0, 0]


@needs_dali
def test_dali_truncated_file_is_named(tmp_path):
    root = odd_split(tmp_path / "train")
    add_bad(root)
    os.remove(os.path.join(root, "c0", "garbage.JPEG"))
    # the full path, class folder included (DALI itself reports it relative to the reader's root)
    full = re.escape(os.path.join(root, "c1", "truncated.JPEG"))
    for train in (False, True):   # plain decode (val) and fused decode + random crop (train)
        # refused by the feed before DALI sees it (DALI's decoder can crash on it), the file named
        with pytest.raises(BadImageError, match=f"'{full}'.*Refused before decoding") as e:
            list(build_rotation_loader(make_cfg(("dali", {"backend": "dali"})), root, batch_size=7,
                                       train=train, seed=0))
        assert e.value.__cause__ is None and "\n" not in str(e.value)
    # a PNG cut short: alone, DALI fails with an internal error that names no file ("#17")
    os.remove(os.path.join(root, "c1", "truncated.JPEG"))
    cut = os.path.join(root, "c1", "cut.png")
    with open(cut, "wb") as f:
        f.write(open(os.path.join(root, "c0", "png named.JPEG"), "rb").read()[:-12])
    for train in (False, True):
        with pytest.raises(BadImageError, match=f"'{re.escape(cut)}': a truncated PNG.*Refused before"):
            list(build_rotation_loader(make_cfg(("dali", {"backend": "dali"})), root, batch_size=7,
                                       train=train, seed=0))


@needs_dali
def test_dali_zero_size_jpeg_alone_in_its_batch_is_named(tmp_path):
    """Alone in a batch it makes DALI say "invalid parameter", which a bug can say too: the file is named
    because a sample in flight declares 0x0; the same status with no such sample keeps its traceback."""
    root = make_folder(tmp_path / "train", [2, 1], name="{i}.JPEG")
    zero = os.path.join(root, "c1", "zero.JPEG")
    with open(zero, "wb") as f:
        f.write(declaring(open(os.path.join(root, "c1", "0.JPEG"), "rb").read(), 0, 0))
    build = functools.partial(build_rotation_loader, make_cfg(("dali", {"backend": "dali"})), root,
                              batch_size=1, seed=0)
    for train in (False, True):
        with pytest.raises(BadImageError, match=f"'{re.escape(zero)}'"):
            list(build(train=train))
    os.remove(zero)
    lo = build(train=False)
    batches = iter(lo)
    next(batches)

    class Broken:   # the pipeline failing so with good files in flight: a bug, not a file
        def run(self):
            raise RuntimeError("Error in CPU operator `decoders.image`: nvImageCodec failure: '#2'")
    lo._pipe = Broken()
    with pytest.raises(RuntimeError, match="'#2'"):
        next(batches)


@needs_dali
def test_dali_file_refused_in_the_codec_s_own_words_is_named(tmp_path):
    """DALI's error for a 32-bit TIFF blames no file ("Invalid sample_type"): the samples in flight are
    decoded alone, and the one DALI cannot decode is named in one line, instead of a traceback."""
    root = make_folder(tmp_path / "train", [3, 2], name="{i}.JPEG")
    tif = os.path.join(root, "c1", "int32.tif")
    with open(tif, "wb") as f:
        f.write(int32_tiff())
    for train in (False, True):   # plain decode (val) and fused decode + random crop (train)
        with pytest.raises(BadImageError, match=f"'{re.escape(tif)}': DALI cannot decode it "
                                                r"\(Invalid sample_type: 8197\)") as e:
            list(build_rotation_loader(make_cfg(("dali", {"backend": "dali"})), root, batch_size=6,
                                       train=train, seed=0))
        assert "\n" not in str(e.value) and "DALI said: Invalid sample_type: 8197" in str(e.value)


@needs_dali
def test_dali_internal_error_on_a_file_names_the_file(tmp_path, monkeypatch):
    """nvImageCodec's internal-error status ("#17") names no file, and DALI's PNG and WebP parsers give it
    on some files: the samples in flight are decoded alone and the one that fails is named in one line,
    even a file that no rule refuses first (here the rule for it is switched off)."""
    monkeypatch.setattr(pipelines.batch, "webp_misread", lambda data: "")
    root = make_folder(tmp_path / "train", [3, 2], name="{i}.JPEG")
    bad = os.path.join(root, "c1", "odd.webp")
    with open(bad, "wb") as f:
        f.write(lossless_webp(True, Image.Exif().tobytes()))
    for train in (False, True):
        with pytest.raises(BadImageError, match=f"'{re.escape(bad)}': DALI cannot decode it") as e:
            list(build_rotation_loader(make_cfg(("dali", {"backend": "dali"})), root, batch_size=6,
                                       train=train, seed=0))
        assert "\n" not in str(e.value)


def test_scan_finds_bad_files_and_loader_uses_its_list(tmp_path, capsys):
    root = odd_split(tmp_path / "data" / "train")
    make_folder(tmp_path / "data" / "val", [1, 1])
    add_bad(root)
    out = str(tmp_path / "lists" / "{split}.txt")
    # dataset root: both splits
    assert scan_main([str(tmp_path / "data"), "--out", out, "--workers", "2"]) == 1
    printed = capsys.readouterr().out
    assert "truncated.JPEG" in printed and "garbage.JPEG" in printed and "cmyk.JPEG" not in printed
    lines = open(out.format(split="train"), encoding="utf-8").read().splitlines()
    assert len(lines) == 6 and "c0/png named.JPEG 0" in lines
    assert len(open(out.format(split="val")).read().splitlines()) == 2
    for param in KINDS:  # the loaders read the list: no bad file, no error
        kind = param.values[0]
        if kind[0] == "dali" and not HAVE_DALI:
            continue
        d = make_cfg(kind, file_list=out)
        lo = build_class_loader(d, root, batch_size=3, train=False, seed=0)
        assert lo.num_samples == 6 and sum(len(y) for _, y in lo) == 6


def test_scan_single_split_clean(tmp_path, capsys):
    root = make_folder(tmp_path / "train", [2, 2])
    out = str(tmp_path / "list.txt")
    assert scan_main([root, "--out", out, "--workers", "1"]) == 0
    assert len(open(out).read().splitlines()) == 4
