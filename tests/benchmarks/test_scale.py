"""benchmarks/scale.py: the table's ratio is each stage's work above the empty process, a failed
stage is a row with its error; and (slow: fresh processes) a real run of three stages on a tiny tree."""
import json
import subprocess
import sys
import time

import pytest

from benchmarks.imagenet_tree import class_counts
from benchmarks.scale import main, table
from benchmarks.scale_stages import process_start, tree_memory_mb
from tests.pipelines.images import make_folder


def test_table_ratio_is_above_the_empty_process_and_errors_are_rows():
    small = [{"stage": "empty", "wall_s": 4.0, "peak_rss_mb": 300.0},
             {"stage": "listing", "wall_s": 5.0, "peak_rss_mb": 320.0, "train_s": 1.0}]
    large = [{"stage": "empty", "wall_s": 4.5, "peak_rss_mb": 300.0},
             {"stage": "listing", "wall_s": 14.5, "peak_rss_mb": 500.0, "train_s": 9.87654},
             {"stage": "val", "wall_s": 2.0, "peak_rss_mb": 90.0, "error": "boom | bang"}]
    rows = table(small, large, 0.1, 1.0).splitlines()
    assert rows[3] == "| listing | 5.0 | 14.5 | 10.0x | 500 | train_s=9.88 |"
    assert rows[2].startswith("| empty | 4.0 | 4.5 | - |")
    assert rows[4] == "| val | - | 2.0 | - | 90 | error: boom / bang |"


def test_process_start_is_the_kernels_start_of_the_process():
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        started = process_start(str(child.pid))
    finally:
        child.kill()
        child.wait()
    assert before - 0.02 <= started <= before + 0.25   # one clock tick (10 ms) of resolution, a fork
    assert process_start() < before


def test_tree_memory_counts_a_childs_private_memory():
    """96 MB written by a child (a DataLoader worker's stand-in) shows in each of the tree's figures."""
    before = tree_memory_mb()
    code = "import time; b = bytes(range(256)) * (3 << 17); print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        during = tree_memory_mb()
    finally:
        child.kill()
        child.wait()
    assert all(during[k] - before[k] > 80 for k in ("anon", "uss", "pss")), (before, during)
    assert 0 < during["anon"] <= during["pss"] + 1


@pytest.mark.slow
def test_three_stages_on_a_tiny_tree(tmp_path):
    pool = make_folder(tmp_path / "pool", [50, 50], size=(40, 40))   # the default pool of 100
    out = tmp_path / "bench.md"
    argv = ["--scale", "1/1000", "--compare", "1/1000", "--trees", str(tmp_path / "trees"), "--pool", pool,
            "--stages", "empty,listing,epoch", "--json", str(tmp_path / "scale.json"), "--out", str(out)]
    assert main(argv + ["--no-write"]) == 0 and not out.exists()
    record = json.loads((tmp_path / "scale.json").read_text())
    listing = record["scale 0.001"][1]
    assert listing["stage"] == "listing" and "error" not in listing, listing
    assert listing["train_files"] == sum(max(1, round(c / 1000)) for c in class_counts())
    assert listing["peak_rss_mb"] > 50 and listing["val_files"] == 50
