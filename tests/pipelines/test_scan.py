"""pipelines.scan checks what training reads: every file it passes decodes in a DALI CPU pipeline
as training decodes (readers.file -> decoders.image, RGB), every file it fails does not, on crafted
files of each kind; without DALI (--decoder torch) the same verdicts: the torch backends' decoder, GIF
refused by rule."""
import os

import numpy as np
import pytest

from pipelines.scan import dali_reasons, main, scan_split
from tests.pipelines.images import (
    corrupt_jpeg,
    declaring,
    encoded,
    exif_orientation,
    int32_tiff,
    jpeg,
    lossless_webp,
    needs_dali,
    png_chunk_flipped,
    png_with_chunk,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
PNG = encoded(RGB, "PNG")
EXIF6 = exif_orientation(6)


# name -> (bytes, whether training can decode it)
CRAFTED = {
    "empty.JPEG": (b"", False),
    "gif.JPEG": (encoded(RGB, "GIF"), False),                 # PIL reads it, DALI does not
    "truncated.JPEG": (jpeg(RGB)[:600], False),
    "zero_size.JPEG": (declaring(jpeg(RGB), 0, 0), False),    # alone, DALI's "invalid parameter"
    "zero_height.png": (declaring(encoded(RGB, "PNG"), 50, 0), False),
    "png16.png": (encoded(RNG.integers(0, 65535, (40, 50)).astype(np.uint16), "PNG"), True),
    "palette.png": (encoded(RGB, "PNG", "P"), True),
    "rgba.png": (encoded(np.dstack([RGB, RGB[..., 0]]), "PNG"), True),
    "one_pixel.JPEG": (jpeg(RGB[:1, :1]), True),
    "cmyk.JPEG": (jpeg(RGB, "CMYK"), True),
    "gray.JPEG": (jpeg(RGB, "L"), True),
    "plain.JPEG": (jpeg(RGB), True),
    "int16.tif": (encoded(RNG.integers(-999, 999, (40, 50)).astype(np.int16), "TIFF"), False),   # PIL: "I"
    "uint32.tif": (encoded(RNG.integers(0, 2**31, (40, 50)).astype(np.uint32), "TIFF"), False),
    "uint16.tif": (encoded(RNG.integers(0, 65535, (40, 50)).astype(np.uint16), "TIFF"), True),
    "float.tif": (encoded(RNG.random((40, 50)).astype(np.float32), "TIFF"), True),
    "pgm16.pgm": (b"P5\n50 40\n65535\n" + RNG.integers(0, 65535, (40, 50)).astype(">u2").tobytes(), True),
    "onebit.tif": (encoded(RGB, "TIFF", "1"), False),        # PIL leaves out BitsPerSample (1 by default)
    "palette.tif": (encoded(RGB, "TIFF", "P"), True),
    "no_iend.png": (PNG[:-12], False),                       # alone, DALI fails with an internal error
    "iend_cut.png": (PNG[:-2], False),                       # torchvision and PIL read both
    "idat_crc.png": (png_chunk_flipped(PNG, b"IDAT"), False),   # torchvision crashes on it, OpenCV refuses
    "text_crc.png": (png_with_chunk(PNG, b"tEXt", b"note\x00hi", crc=0), True),   # PIL refused it
    "trailer.png": (PNG + b"bytes after IEND", True),
    "corrupt.JPEG": (corrupt_jpeg(jpeg(RGB), 100), True),   # torchvision and PIL refused it
    "odd_exif.webp": (lossless_webp(True, EXIF6), False),    # DALI's parser misreads it
    "even_exif.webp": (lossless_webp(False, EXIF6), True),
}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> str:
    split = tmp_path_factory.mktemp("crafted") / "train"
    (split / "c0").mkdir(parents=True)
    for name, (data, _) in CRAFTED.items():
        (split / "c0" / name).write_bytes(data)
    return str(split)


def trains(path: str) -> bool:
    """Whether `path` decodes in a DALI CPU pipeline the way training decodes it."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        jpegs, _ = fn.readers.file(files=[path])
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    try:
        pipe = graph()
        pipe.build()
        (out,) = pipe.run()
    except RuntimeError:
        return False
    return np.asarray(out.at(0)).shape[2] == 3


def verdicts(split: str, decoder: str) -> dict[str, str]:
    good, _, bad, _ = scan_split(split, workers=1, decoder=decoder)
    return {**{os.path.basename(g): "" for g in good}, **{os.path.basename(p): why for p, why in bad}}


@needs_dali
def test_the_dali_scan_passes_exactly_what_trains(crafted):
    found = verdicts(crafted, "dali")
    assert {n for n, why in found.items() if not why} == {n for n, (_, ok) in CRAFTED.items() if ok}
    for name in CRAFTED:
        assert trains(os.path.join(crafted, "c0", name)) == (not found[name]), name
    assert found["empty.JPEG"] == "empty (0-byte) file"
    assert found["gif.JPEG"].startswith("a GIF, which DALI's decoder (training's) cannot read")
    assert found["truncated.JPEG"].startswith("a truncated JPEG (no end-of-image marker")
    assert found["zero_size.JPEG"].startswith("a JPEG whose header declares a 0x0 (width x height) image")
    assert found["zero_height.png"].startswith("a PNG whose header declares a 50x0 (width x height) image")


def test_without_dali_the_same_verdicts_and_gif_refused_by_rule(crafted):
    found = verdicts(crafted, "torch")
    assert {n for n, why in found.items() if not why} == {n for n, (_, ok) in CRAFTED.items() if ok}
    assert found["gif.JPEG"].startswith("a GIF, which DALI's decoder (training's) cannot read")
    assert found["int16.tif"].startswith("a TIFF of signed or 32-bit integer samples, which DALI's decoder")
    assert found["onebit.tif"].startswith("a TIFF without a BitsPerSample tag, which DALI's decoder")


@needs_dali
def test_one_bad_file_in_a_full_batch_is_the_one_named(tmp_path):
    paths = []
    for i in range(70):   # a batch of 64 with the bad file in it, and a second batch
        paths.append(str(tmp_path / f"{i}.JPEG"))
        (tmp_path / f"{i}.JPEG").write_bytes(CRAFTED["truncated.JPEG"][0] if i == 37 else jpeg(RGB[:8, :8]))
    reasons = dali_reasons(paths, workers=1)
    assert [i for i, why in enumerate(reasons) if why] == [37]


def test_a_failed_batch_is_decoded_again_file_by_file(tmp_path, monkeypatch):
    """DALI names no file when a batch fails, and the pipeline is spent: each file of that batch is
    decoded alone in a new pipeline, and only the one that fails alone is named."""
    import pipelines.scan

    built, bad = [], jpeg(RGB[:8, :8], "L")   # stands for a file DALI cannot decode

    class Pipe:
        def feed_input(self, name, arrays):
            self.arrays = arrays

        def run(self):
            if any(a.tobytes() == bad for a in self.arrays):
                raise RuntimeError("Error in CPU operator `decoders.image`: Failed to decode sample #3")

    monkeypatch.setattr(pipelines.scan, "_dali_decoder", lambda workers: built.append(1) or Pipe())
    paths = []
    for i in range(70):
        paths.append(str(tmp_path / f"{i}.JPEG"))
        (tmp_path / f"{i}.JPEG").write_bytes(bad if i == 3 else jpeg(RGB[:8, :8]))
    reasons = dali_reasons(paths, workers=1)
    assert [i for i, why in enumerate(reasons) if why] == [3]
    assert reasons[3].startswith("DALI cannot decode it (") and len(built) == 3   # batch, alone, after


@needs_dali
def test_a_file_dali_refuses_in_words_of_its_own_is_named_and_the_scan_goes_on(tmp_path, capsys):
    """A 32-bit TIFF: PIL reads it, DALI's codec refuses it with no status that blames a file. Decoded
    alone it fails while a known-good JPEG decodes: the file is named, the others listed."""
    (tmp_path / "c0").mkdir()
    for name in ("a.JPEG", "int32.tif", "b.JPEG"):
        (tmp_path / "c0" / name).write_bytes(int32_tiff() if name == "int32.tif" else jpeg(RGB))
    assert not trains(str(tmp_path / "c0" / "int32.tif"))
    out = str(tmp_path / "list.txt")
    assert main([str(tmp_path), "--out", out, "--workers", "1", "--decoder", "dali"]) == 1
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD ")]
    assert bad == [f"BAD {tmp_path / 'c0' / 'int32.tif'}: DALI cannot decode it (Invalid sample_type: 8197)"]
    assert open(out).read().split() == ["c0/a.JPEG", "0", "c0/b.JPEG", "0"]


@pytest.mark.parametrize("fails_on_good", [False, True], ids=["the-file", "the-decoder"])
def test_an_error_without_a_status_blames_the_file_only_if_a_good_jpeg_decodes(tmp_path, monkeypatch,
                                                                                fails_on_good):
    """An error in a codec's own words is the file's when the decoder reads a known-good JPEG right after;
    a decoder that fails on that JPEG too is broken: its error is raised, not a file named."""
    import pipelines.scan

    bad = b"\xff\xd8\xff" + b"stands for a file the decoder refuses" + b"\xff\xda\xff\xd9"

    class Pipe:
        def feed_input(self, name, arrays):
            self.arrays = arrays

        def run(self):
            if fails_on_good or any(a.tobytes() == bad for a in self.arrays):
                raise RuntimeError("Error in CPU operator `decoders.image`,\nencountered:\n\nsomething new")

    monkeypatch.setattr(pipelines.scan, "_dali_decoder", lambda workers: Pipe())
    paths = [str(tmp_path / f"{i}.JPEG") for i in range(3)]
    for i, p in enumerate(paths):
        open(p, "wb").write(bad if i == 1 else jpeg(RGB[:8, :8]))
    if fails_on_good:
        with pytest.raises(RuntimeError, match="something new"):
            dali_reasons(paths, workers=1)
    else:
        assert dali_reasons(paths, workers=1) == ["", "DALI cannot decode it (something new)", ""]


@needs_dali
def test_a_jpeg_declaring_0x0_is_named_in_one_line_and_the_scan_goes_on(tmp_path, capsys):
    (tmp_path / "c0").mkdir()
    for name in ("a.JPEG", "zero.JPEG", "b.JPEG"):   # decoded alone, it would stop DALI ("invalid parameter")
        (tmp_path / "c0" / name).write_bytes(declaring(jpeg(RGB), 0, 0) if name == "zero.JPEG" else jpeg(RGB))
    out = str(tmp_path / "list.txt")
    assert main([str(tmp_path), "--out", out, "--workers", "1", "--decoder", "dali"]) == 1
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD ")]
    assert bad == [f"BAD {tmp_path / 'c0' / 'zero.JPEG'}: a JPEG whose header declares a 0x0 (width x "
                   "height) image, which DALI cannot decode: re-encode it from its source or remove it"]
    assert open(out).read().split() == ["c0/a.JPEG", "0", "c0/b.JPEG", "0"]


def test_the_scan_lists_what_trains_and_says_which_decoder(crafted, tmp_path, capsys):
    out = str(tmp_path / "list.txt")
    assert main([crafted, "--out", out, "--workers", "1", "--decoder", "pil"]) == 1   # torch's former name
    printed = capsys.readouterr().out
    assert printed.startswith("decoding with the torch backends' decoder, as training without DALI does")
    assert f"BAD {os.path.join(crafted, 'c0', 'empty.JPEG')}: empty (0-byte) file" in printed
    listed = {line.split()[0] for line in open(out)}
    assert listed == {f"c0/{n}" for n, (_, ok) in CRAFTED.items() if ok}


@pytest.mark.slow
@needs_dali
def test_a_9000_by_7000_jpeg_passes_and_trains(tmp_path):
    big = np.kron(RNG.integers(0, 256, (90, 70, 3), dtype=np.uint8), np.ones((100, 100, 1), np.uint8))
    (tmp_path / "c0").mkdir()
    (tmp_path / "c0" / "big.JPEG").write_bytes(jpeg(np.ascontiguousarray(big.transpose(1, 0, 2))))
    assert verdicts(str(tmp_path), "dali") == {"big.JPEG": ""} == verdicts(str(tmp_path), "torch")
    assert trains(str(tmp_path / "c0" / "big.JPEG"))
