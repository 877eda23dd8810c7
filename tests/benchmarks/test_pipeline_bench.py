"""benchmarks/pipeline.py: every row ends at the same model input, and the run says so or stops.
The figures are the coordinator's; these tests check what the rows emit and what the block says."""
import pytest
import torch
from PIL import Image

from benchmarks import pipeline
from benchmarks.ffcv_rows import jpeg_quality
from benchmarks.pipeline import output_spec, rotate4, table, unequal_rows
from pipelines import prepare_batch
from pipelines.recipe import rotate_batch
from rotnet.config import load_config
from tests.pipelines.images import make_folder

MEAN = torch.tensor(pipeline.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(pipeline.IMAGENET_STD).view(1, 3, 1, 1)


def _crops(n=3, s=6):
    """uint8 (n, s, s, 3) crops with every value 0-255 present."""
    return torch.randint(0, 256, (n, s, s, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_reference_and_rotnet_rows_end_at_the_same_tensor():
    crops = _crops()
    # reference: ToTensor + Normalize (float32 NCHW), then rotate4
    ref = rotate4((crops.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD)
    # rotnet: the loader's uint8 (4N, S, S, C) sample-major batch, then prepare_batch
    rotated, _ = rotate_batch(crops, [0, 90, 180, 270], "all", torch.Generator())
    ours = prepare_batch(rotated.flatten(0, 1), load_config(None, []).data, channels_last=True)
    assert torch.allclose(ref, ours, atol=1e-5)
    assert output_spec(ref) == output_spec(ours) == \
        "float32 (12, 3, 6, 6) channels-last, ImageNet-normalised, 4 rotations"


def test_output_spec_tells_unequal_work_apart():
    crops = _crops()
    rotated, _ = rotate_batch(crops, [0, 90, 180, 270], "all", torch.Generator())
    assert output_spec(rotated.flatten(0, 1)) == "uint8 (12, 6, 6, 3) NHWC, not normalised, 4 rotations"
    unit = crops.permute(0, 3, 1, 2).float() / 255         # ToTensor without Normalize
    assert output_spec(unit) == "float32 (3, 3, 6, 6) channels-last, not normalised, one view"
    assert output_spec(rotate4(unit.contiguous())).endswith("not normalised, 4 rotations")
    assert output_spec(rotate4(unit).contiguous()).startswith("float32 (12, 3, 6, 6) NCHW")
    shuffled = rotate4((unit - MEAN) / STD)[torch.randperm(12, generator=torch.Generator().manual_seed(1))]
    assert output_spec(shuffled).endswith("one view")       # rotations out of order: not sample-major
    assert unequal_rows({"reference": "a", "dali": "a", "ffcv": "b", "torch": "c"}) == ["torch"]
    assert unequal_rows({"reference": "a", "ffcv": "b", "ffcv-rot": "a"}) == []


def test_table_gives_both_ratios():
    specs = dict.fromkeys(("dali", "reference", "ffcv-rot"), "S")
    lines = table({"dali": 300.0, "reference": 100.0, "ffcv-rot": 200.0}, specs)
    assert lines[2] == "| dali | 300 | 3.00x | 1.50x | S |"
    assert lines[4] == "| ffcv-rot | 200 | 2.00x | 1.00x | S |"
    assert table({"dali": 300.0}, {"dali": "S"})[2] == "| dali | 300 | - | - | S |"


def test_jpeg_quality_is_read_from_the_file(tmp_path):
    img = Image.fromarray(_crops(1, 32)[0].numpy())
    for q in (40, 75, 95):
        img.save(tmp_path / f"q{q}.jpg", quality=q)
        assert jpeg_quality(tmp_path / f"q{q}.jpg") == q
    img.save(tmp_path / "x.png")
    assert jpeg_quality(tmp_path / "x.png") == 90


def _fake_rows(uint8_row=""):
    """row_batches stand-in: equal-work batches (or the loader's raw uint8 for `uint8_row`)."""
    def rows(name, args, device):
        def gen():
            rotated, _ = rotate_batch(_crops(args.batch_size, args.crop), [0, 90, 180, 270], "all",
                                      torch.Generator())
            x = rotated.flatten(0, 1)
            if name != uint8_row:
                x = prepare_batch(x, load_config(None, []).data, channels_last=True)
            while True:
                yield x, torch.arange(4).repeat(args.batch_size)
        return gen()
    return rows


def _argv(data, out):
    return ["--data", data, "--backends", "dali,torch,reference", "--batch-size", "2", "--steps", "2",
            "--warmup", "1", "--crop", "8", "--threads", "1", "--out", str(out)]


def test_block_header_and_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "row_batches", _fake_rows())
    data = make_folder(tmp_path / "train", [2, 1], size=(30, 40))
    out = tmp_path / "bench.md"
    assert pipeline.main(_argv(data, out)) == 0
    text = out.read_text()
    assert "## Input pipeline, equal work (benchmarks/pipeline.py), 20" in text and " UTC" in text
    for part in ("- commit ", "cores", "load average before the run: ", "1 workers/threads per row",
                 f"- command: `python benchmarks/pipeline.py --data {data} --backends dali,torch,",
                 "(3 images, mean 40x30 px, "):
        assert part in text, part
    spec = "float32 (8, 3, 8, 8) channels-last, ImageNet-normalised, 4 rotations"
    for name in ("dali", "torch", "reference"):
        assert f"| {name} | " in text and text.count(spec) == 3


def test_unequal_row_stops_the_run_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "row_batches", _fake_rows(uint8_row="torch"))
    out = tmp_path / "bench.md"
    with pytest.raises(SystemExit, match=r"\['torch'\].*not equal work"):
        pipeline.main(_argv(make_folder(tmp_path / "train", [1]), out))
    assert not out.exists()


def test_missing_ffcv_skips_its_rows_with_a_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "row_batches", _fake_rows())
    monkeypatch.setattr(pipeline, "ffcv_missing", lambda device: "ffcv does not import (test)")
    argv = _argv(make_folder(tmp_path / "train", [1]), tmp_path / "bench.md")
    argv[argv.index("--backends") + 1] = "reference,ffcv,ffcv-rot"
    assert pipeline.main(argv) == 0
    assert "ffcv rows skipped: ffcv does not import (test)" in capsys.readouterr().out
    assert "- FFCV rows skipped: ffcv does not import (test)" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_real_rows_end_at_the_same_output(tmp_path, monkeypatch):
    """Both rotnet backends, the torchvision reference and (where FFCV imports) both FFCV rows, for real."""
    monkeypatch.setenv("ROTNET_CACHE", str(tmp_path / "cache"))     # the .beton goes there
    data = make_folder(tmp_path / "set" / "train", [6, 6], size=(48, 64))
    with_ffcv = pipeline.ffcv_missing(torch.device("cpu")) == ""
    rows = "dali,torch,reference" + (",ffcv,ffcv-rot" if with_ffcv else "")
    out = tmp_path / "bench.md"
    argv = _argv(data, out)
    argv[argv.index("--backends") + 1] = rows
    assert pipeline.main(argv) == 0
    text = out.read_text()
    assert text.count("float32 (8, 3, 8, 8) channels-last, ImageNet-normalised, 4 rotations") == \
        len(rows.split(",")) - with_ffcv
    if with_ffcv:
        assert "float32 (2, 3, 8, 8) channels-last, ImageNet-normalised, one view" in text
