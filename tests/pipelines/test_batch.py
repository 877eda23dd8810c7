"""The batch contract (pipelines/batch.py): a resumed loader continues with exactly the same batches
(image folders and tar shards); loader-side normalisation (loader.normalize=graph) meets the model:
dtype and memory layout; the rules that refuse a file before any decoder sees it."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import batch_preparer, build_class_loader, build_rotation_loader, prepare_batch
from pipelines.batch import by_rule, format_problem, truncated, webp_misread, zero_size
from rotnet.cli import InputError
from rotnet.config import load_config
from rotnet.distributed import DistInfo
from tests.pipelines.images import (
    FORMATS,
    KINDS,
    cfg,
    declaring,
    encoded,
    in_format,
    jpeg,
    lossless_webp,
    make_folder,
    needs_dali,
    png_chunk_flipped,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("state") / "train", [4, 4, 3], size=(40, 52))


def roundtrip(state):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def take(loader, epoch, n):
    """The next n batches, crossing into the following epochs as a training loop would."""
    out = []
    while len(out) < n:
        loader.set_epoch(epoch)
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out, epoch
        epoch += 1
    return out, epoch


def build(kind, split, seed=5, fmt="folder"):
    name, over = kind  # prefetch 2: the DALI checkpoint must follow what was consumed, not prefetched
    d = cfg(prefetch=2, num_threads=2, format=fmt, **over)
    return build_rotation_loader(d, in_format(split, fmt), batch_size=2, train=True, seed=seed,
                                 info=DistInfo(rank=1, world_size=2))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [1, 2, 3])  # mid-epoch, at the epoch's end, into the next epoch
def test_resume_continues_same_batches(split, kind, skip, fmt):
    a = build(kind, split, fmt=fmt)
    assert a.backend == ("dali" if kind[0] == "dali" else "torch")
    assert len(a) == 2  # 11 images, 2 ranks (5 each after the drop), 2 originals per step
    _, epoch = take(a, 0, skip)
    state = roundtrip(a.state_dict())
    expected, _ = take(a, epoch, 3)

    b = build(kind, split, fmt=fmt)
    b.load_state_dict(state)
    got, _ = take(b, epoch, 3)
    for (xa, ya), (xb, yb) in zip(expected, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("kind", KINDS)
def test_different_seed_different_order(split, kind):
    xa = take(build(kind, split, seed=1), 0, 1)[0][0][0]
    xb = take(build(kind, split, seed=2), 0, 1)[0][0][0]
    assert not torch.equal(xa, xb)


@needs_dali
def test_state_rejects_other_backend(split):
    dali = build(("dali", {"backend": "dali"}), split)
    torch_loader = build(("torch", {"backend": "torch"}), split)
    with pytest.raises(InputError, match="backend"):
        torch_loader.load_state_dict(dali.state_dict())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_labels_per_class_subset_deterministic_and_balanced(tmp_path, kind, fmt):
    root = in_format(make_folder(tmp_path / "train", [6, 5, 7], size=(34, 34)), fmt)
    name, over = kind
    d = cfg(format=fmt, **over)

    def labels(seed, rank):
        lo = build_class_loader(d, root, batch_size=2, info=DistInfo(rank=rank, world_size=2),
                                train=False, seed=seed, labels_per_class=3)
        assert lo.num_samples == 9
        return [(int(v), x[i].float().mean().item()) for x, y in lo for i, v in enumerate(y)]

    a = labels(0, 0) + labels(0, 1)
    assert sorted(lab for lab, _ in a) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # balanced, all ranks together
    assert a == labels(0, 0) + labels(0, 1)                           # deterministic
    assert a != labels(1, 0) + labels(1, 1)                           # the seed picks the subset


# every loader that can normalise itself on CPU (loader.normalize=graph); dali-graph = the GPU graph
VARIANTS = [pytest.param(dict(backend="dali"), id="dali", marks=needs_dali),
            pytest.param(dict(backend="dali", dali_rotate_in_graph=True), id="dali-graph", marks=needs_dali),
            pytest.param(dict(backend="torch"), id="torch"),
            pytest.param(dict(backend="torch", resident=True), id="resident")]


def first(split, over, **kw):
    lo = build_rotation_loader(cfg(**over, **kw), split, batch_size=2, train=False, seed=0)
    return next(iter(lo))


@pytest.mark.parametrize("over", VARIANTS)
def test_fp32_model_gets_float32_and_autocast_runs_copy_nothing(square_split, over):
    """train.precision=fp32 with loader normalisation: prepare_batch as the trainer calls it gives the
    float32 a float32 model takes; dtype=None (autocast runs) returns the loader's tensor itself."""
    x16, _ = first(square_split, over, normalize="graph")
    assert x16.dtype == torch.float16 and x16.shape == (8, 3, 32, 32)
    assert x16.is_contiguous(memory_format=torch.channels_last)  # NHWC memory, as the graph wrote it
    x = prepare_batch(x16, cfg().data, channels_last=True)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)  # a float32 model, no autocast
    assert x.dtype == torch.float32 and conv(x).dtype == torch.float32
    same = prepare_batch(x16, cfg().data, channels_last=True, dtype=None)
    assert same.data_ptr() == x16.data_ptr() and same.dtype == torch.float16  # bf16/fp16 runs: no copy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(same).dtype == torch.bfloat16


@pytest.mark.parametrize("over", VARIANTS)
def test_loader_normalisation_equals_trainer_normalisation(square_split, over):
    """Same pixels whichever side normalises; the loader's output is already channels_last."""
    x8, y8 = first(square_split, over)
    x16, y16 = first(square_split, over, normalize="graph")
    assert torch.equal(y8, y16)
    ref = prepare_batch(x8, cfg().data, channels_last=True)
    torch.testing.assert_close(prepare_batch(x16, cfg().data, channels_last=True), ref, atol=2e-2, rtol=1e-2)


def test_batch_preparer_keeps_float16_under_autocast_and_casts_for_fp32():
    """Under autocast (bf16, fp16) a loader-normalised float16 batch is not cast to float32 only for
    autocast to cast it back: the model gets it as it is. An fp32 model gets float32."""
    c = load_config("configs/sample.yaml", ["model.width=0.25", "train.channels_last=true", "data.root=x"])
    x16 = torch.randn(2, 8, 8, 3, dtype=torch.float16).permute(0, 3, 1, 2)   # the graph's NHWC memory
    for precision in ("bf16", "fp16"):
        out = batch_preparer(c, precision)(x16)
        assert out.dtype == torch.float16 and out.data_ptr() == x16.data_ptr()   # no copy at all
    out = batch_preparer(c, "fp32")(x16)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    u8 = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    assert all(batch_preparer(c, p)(u8).dtype == torch.float32 for p in ("bf16", "fp32"))


# ---------------------------------------------------------------- the files a batch may hold
RGB = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)


@pytest.mark.parametrize("make, why", [
    (lambda d: d[:600], "a truncated JPEG"),
    (lambda d: d, ""),                                             # ends with its marker
    (lambda d: d + b"camera trailer", ""),                         # bytes after the marker
    (lambda d: d[:d.index(b"\xff\xda")] + b"\xff\xd9", "a truncated JPEG"),   # no image data at all
    (lambda d: encoded(RGB, "PNG"), ""),
    (lambda d: encoded(RGB, "PNG")[:-12], "a truncated PNG"),                  # no IEND: DALI's "#17"
    (lambda d: encoded(RGB, "PNG")[:-2], "a truncated PNG"),                   # IEND cut: DALI refuses
    (lambda d: encoded(RGB, "PNG")[:300], "a truncated PNG"),                  # inside IDAT
    (lambda d: encoded(RGB, "PNG") + b"trailer", ""),
    (lambda d: png_chunk_flipped(encoded(RGB, "PNG"), b"IDAT"), ""),          # whole: the decoders judge it
], ids=["cut", "whole", "trailer", "no-scan", "png", "png-no-iend", "png-iend-cut", "png-cut", "png-trailer",
        "png-idat-crc"])
def test_a_jpeg_or_png_cut_short_is_refused_by_rule(make, why):
    """DALI can crash on a JPEG cut short in a batch and fails on a PNG cut short without naming it: such
    files reach no decoder. Bytes after the end pass; a whole file with damaged data is the decoders'."""
    data = make(jpeg(RGB))
    assert truncated(data).startswith(why) and bool(truncated(data)) == bool(why)


@pytest.mark.parametrize("make, w, h, refused", [
    (lambda: jpeg(RGB), 0, 0, True), (lambda: jpeg(RGB), 0, 40, True), (lambda: jpeg(RGB), 50, 0, True),
    (lambda: jpeg(RGB), 50, 40, False),
    (lambda: encoded(RGB, "JPEG", progressive=True), 0, 0, True),        # SOF2
    (lambda: encoded(RGB, "JPEG", progressive=True), 50, 40, False),
    (lambda: encoded(RGB, "JPEG", exif=b"Exif\x00\x00" + bytes(3000)), 0, 7, True),   # APP1 before SOF
    (lambda: encoded(RGB, "PNG"), 0, 0, True), (lambda: encoded(RGB, "PNG"), 50, 40, False),
], ids=["0x0", "0xH", "Wx0", "WxH", "progressive-0x0", "progressive", "exif-0xH", "png-0x0", "png"])
def test_a_header_declaring_a_0_side_is_refused_by_rule(make, w, h, refused):
    """DALI's status for such a file alone is "invalid parameter", which a bug can give too: the header
    names it exactly. Other formats and headers cut short are left to the decoder."""
    why = zero_size(declaring(make(), w, h))
    assert bool(why) == refused and (not why or f"declares a {w}x{h} (width x height) image" in why)
    assert zero_size(declaring(jpeg(RGB), 0, 0)[:40]) == zero_size(encoded(RGB, "BMP")) == ""


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"])
def test_the_formats_training_reads_pass_the_format_rule(fmt):
    assert format_problem(encoded(RGB, fmt)[:12]) == ""


@pytest.mark.parametrize("head, why, advice", [
    (b"", "empty (0-byte) file", ""),
    (b"GIF89a\x01\x00", "a GIF", "convert it to JPEG or PNG"),
    (b"<html><body>", "not an image format training reads", "JPEG, PNG, BMP, TIFF, PNM, JPEG 2000, WebP"),
], ids=["empty", "gif", "html"])   # html: a saved error page named .JPEG
def test_other_files_fail_the_format_rule_in_words_for_every_backend(head, why, advice):
    """The message says what to do, not which backend happens to refuse the file."""
    assert format_problem(head).startswith(why) and advice in format_problem(head)


@pytest.mark.parametrize("odd, meta, refused", [(True, "exif", True), (False, "exif", False),
                                                (True, "xmp", False), (True, "", False)])
def test_a_lossless_webp_dali_misreads_is_refused_by_rule(odd, meta, refused):
    """DALI's WebP parser fails (an internal error, no file named) on an EXIF chunk after a lossless image
    chunk of odd length; other lossless and lossy WebPs, with EXIF or XMP, it reads."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = lossless_webp(odd, exif.tobytes() if meta == "exif" else b"")
    if meta == "xmp":
        data = encoded(np.asarray(Image.open(io.BytesIO(data))), "WEBP", lossless=True, xmp=b"<x>hi</x>")
    assert bool(webp_misread(data)) == refused and by_rule(data) == webp_misread(data)
    assert webp_misread(encoded(RGB, "WEBP", quality=80, exif=exif.tobytes())) == ""

