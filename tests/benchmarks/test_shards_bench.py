"""benchmarks/shards.py at toy size: every row runs for real (the figures are the coordinator's).
Slow-ish: two fresh Python processes time the listings."""
import pytest

from benchmarks.shards import HEADING, main
from tests.pipelines.images import make_folder


@pytest.mark.slow
def test_shards_benchmark_writes_its_block(tmp_path):
    data = make_folder(tmp_path / "set" / "train", [6, 6], size=(48, 64))
    out = tmp_path / "bench.md"
    args = ["--data", data, "--shards", str(tmp_path / "sh"), "--limit", "10", "--shard-size", "4",
            "--workers", "1", "--list-repeats", "1", "--batch-size", "4", "--steps", "1", "--warmup", "1",
            "--crop", "32",
            "--threads", "1", "--backends", "torch", "--out", str(out)]
    assert main(args) == 0
    text = out.read_text()
    assert HEADING in text and "10 images" in text and "3 shards" in text
    for row in ("listing, first call", "files opened per epoch and process | 10 | 3 |", "read all bytes",
                "torch loader"):
        assert row in text, text
