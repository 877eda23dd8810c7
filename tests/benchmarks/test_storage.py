"""benchmarks/storage.py and benchmarks/latency_fs.py: their pure parts (settings, the table writer,
the timing loop) need no FUSE. The mount itself (its C server: the bytes, the latency, the link's cap,
its clean-up): slow tests, skipped where FUSE or the built server is missing."""
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks import latency_fs, storage, storage_readers
from pipelines.dali_loader import read_file
from rotnet.cli import UsageExit


# ------------------------------------------------------------------ settings
def test_latencies_parse_in_order_and_refuse_bad_values():
    assert storage.parse_latencies("0, 0.5,2,5") == [0.0, 0.5, 2.0, 5.0]
    for bad in ("", "1,x", "-1"):
        with pytest.raises(storage.StorageError, match="--latencies"):
            storage.parse_latencies(bad)


def test_conditions_put_the_local_disk_first():
    assert storage.conditions([0.0, 0.5, 2.0]) == [("local disk", None), ("+0 ms", 0.0), ("+0.5 ms", 0.5),
                                                   ("+2 ms", 2.0)]


def test_quick_overrides_the_sizes_and_bad_settings_name_their_flag(tmp_path):
    args = storage.parse_args(["--pool", str(tmp_path), "--quick", "--images", "5000"])
    assert (args.images, args.latencies, args.seconds) == (256, [0.0, 2.0], 0.5)
    assert args.work.endswith(os.path.join("storage-bench", "256"))
    assert args.argv[1:] == ["--pool", str(tmp_path), "--quick", "--images", "5000"]
    with pytest.raises(storage.StorageError, match="--shard-size 0"):
        storage.parse_args(["--pool", str(tmp_path), "--shard-size", "0"])
    with pytest.raises(UsageExit):
        storage.main(["--pool", str(tmp_path / "missing")])


def test_latency_fs_refuses_bad_settings_in_one_line(tmp_path, capsys):
    args = latency_fs.get_parser().parse_args([str(tmp_path), str(tmp_path), "--latency-ms", "-1"])
    with pytest.raises(latency_fs.MountError, match="--latency-ms"):
        latency_fs.parse_settings(args)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "x").write_text("")
    with pytest.raises(latency_fs.MountError, match="empty folder"):
        latency_fs.check_setup(str(tmp_path), str(tmp_path / "mnt"))
    with pytest.raises(UsageExit):
        latency_fs.main([])
    assert capsys.readouterr().err.count("\n") == 1


def test_latency_fs_names_the_setup_script_when_its_server_is_not_built(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(latency_fs.MountError, match="setup_storage.sh"):
        latency_fs.server_command(str(tmp_path), str(tmp_path), latency_fs.LinkSettings())


# ------------------------------------------------------------------ reading
def test_small_file_rate_reads_every_file_one_at_a_time_and_threaded(tmp_path):
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.bin"))
        (tmp_path / f"{i}.bin").write_bytes(b"x" * 100)
    for threads in (1, 3):
        seen = []
        assert latency_fs.small_file_rate(paths, threads, lambda p: seen.append(p) or read_file(p)) > 0
        assert sorted(seen) == sorted(paths)
    with pytest.raises(FileNotFoundError):
        latency_fs.small_file_rate([*paths, str(tmp_path / "missing")], 3, read_file)


# ------------------------------------------------------------------ the report
def test_table_gives_each_latency_as_a_share_of_its_row_at_zero():
    rows = {("rotnet shards", "full"): {"in_flight": 16, "local disk": 1200.0, "+0 ms": 1000.0,
                                        "+2 ms": 930.4, "+5 ms": "failed"},
            ("rotnet folder", "reader"): {"in_flight": 1, "local disk": None, "+0 ms": None, "+2 ms": None}}
    text = storage.table(rows, ["local disk", "+0 ms", "+2 ms", "+5 ms"])
    lines = text.splitlines()
    assert lines[0] == "| reader | mode | reads in flight | local disk | +0 ms | +2 ms | +5 ms |"
    assert lines[2] == ("| rotnet shards | full pipeline, original img/s | 16 | 1,200 | 1,000 | 930 (93%) "
                        "| failed |")
    assert lines[3] == "| rotnet folder | reader-only, samples/s | 1 | n/a | n/a | n/a | n/a |"


def test_cost_table_compares_the_mount_with_the_disk():
    cost = {"local disk": {"one at a time": 4000.0, "32 threads": 8000.0},
            "mount +0 ms": {"one at a time": 1000.0, "32 threads": 2000.0}}
    lines = storage.cost_table(cost).splitlines()
    assert lines[2] == "| one at a time | 4,000 | 1,000 | 0.25 |"
    assert lines[3] == "| 32 threads | 8,000 | 2,000 | 0.25 |"


def test_measure_skips_the_warmup_counts_samples_and_closes_the_reader():
    closed = []

    def steps(n):
        try:
            yield from [8] * n
        finally:
            closed.append(True)

    args = type("A", (), {"warmup": 2, "seconds": 60.0})()
    assert storage.measure(steps(0), args) is None       # a reader without that mode: n/a
    with pytest.raises(RuntimeError, match="stopped"):    # read-ahead samples must not become a rate
        storage.measure(steps(5), args)
    assert closed == [True, True]
    args.seconds = 1e-9
    assert storage.measure(steps(3), args) > 0 and len(closed) == 3   # 2 warm-up steps, 1 timed


def test_a_cell_is_the_median_of_its_rounds_and_failed_if_one_failed():
    assert storage.median_cell([900.0, 1000.0, 5000.0]) == 1000.0
    assert storage.median_cell([900.0, "failed", 1000.0]) == "failed"
    assert storage.median_cell([None, None]) is None


def test_rotnet_reader_only_rows_use_the_loaders_read_only_batches(monkeypatch, tmp_path):
    import numpy as np

    import pipelines

    calls = []

    class Feed:   # what the DALI loader offers: per step of each epoch, the encoded samples of that step
        def read_only_batches(self, epochs):
            calls.append(epochs)
            for _ in epochs:
                yield [np.zeros(3, np.uint8)] * 4
                yield [np.zeros(3, np.uint8)] * 2

    built = []
    monkeypatch.setattr(pipelines, "build_rotation_loader",
                        lambda cfg, split_dir, **kw: built.append(cfg) or Feed())
    args = storage.parse_args(["--pool", str(tmp_path), "--quick"])
    info = {}
    steps = storage_readers.rotnet_steps(args, str(tmp_path), "shards", "reader", info)
    assert [next(steps) for _ in range(4)] == [4, 2, 4, 2] and info["in_flight"] == args.reads_in_flight
    assert len(calls) == 1   # one feed across the epochs, as training keeps one
    assert built[0].data.format == "shards" and built[0].loader.num_threads == 2
    assert built[0].loader.reads_in_flight == args.reads_in_flight


def test_readers_picks_rows_by_prefix_and_refuses_none(tmp_path):
    args = storage.parse_args(["--pool", str(tmp_path), "--readers", "rotnet, dali readers.web"])
    assert args.readers == ["rotnet folder", "rotnet shards", "DALI readers.webdataset"]
    assert storage.parse_args(["--pool", str(tmp_path)]).readers == list(storage.READERS)
    with pytest.raises(storage.StorageError, match="--readers ffcv: no row"):
        storage.parse_args(["--pool", str(tmp_path), "--readers", "ffcv"])


# ------------------------------------------------------------------ the mount (slow, needs FUSE)
def _fuse_missing() -> str:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "no /dev/fuse or fusermount3"
    try:
        latency_fs.server_binary()
    except latency_fs.MountError as e:
        return str(e)
    return ""


needs_fuse = pytest.mark.skipif(bool(_fuse_missing()), reason=_fuse_missing() or "FUSE available")


@pytest.fixture
def tree(tmp_path):
    """(source folder with c/x.bin of 300 kB random bytes, empty mount point, the bytes)."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    (src / "c").mkdir(parents=True)
    data = os.urandom(300_000)
    (src / "c" / "x.bin").write_bytes(data)
    mnt.mkdir()
    return src, mnt, data


@pytest.mark.slow
@needs_fuse
def test_mount_serves_the_same_bytes_and_is_gone_after_an_error(tree):
    src, mnt, data = tree
    with pytest.raises(RuntimeError, match="inside"):
        with latency_fs.mounted(str(src), str(mnt), latency_fs.LinkSettings(latency_ms=1.0)):
            assert os.path.ismount(mnt) and os.listdir(mnt) == ["c"]
            assert (mnt / "c" / "x.bin").read_bytes() == data
            with open(mnt / "c" / "x.bin", "rb") as f:     # no page cache: both reads reach the server
                assert os.pread(f.fileno(), 10, 5) == os.pread(f.fileno(), 10, 5) == data[5:15]
            with pytest.raises(OSError, match="Read-only"):
                open(mnt / "c" / "x.bin", "r+b")
            with pytest.raises(OSError):
                open(mnt / "c" / "new", "wb")
            assert os.statvfs(mnt).f_bsize > 0
            raise RuntimeError("inside")
    assert not os.path.ismount(mnt) and os.listdir(mnt) == []


@pytest.mark.slow
@needs_fuse
def test_each_request_waits_the_latency_and_reads_share_the_capped_link(tree):
    src, mnt, data = tree
    (src / "c" / "y.bin").write_bytes(data)
    with latency_fs.mounted(str(src), str(mnt), latency_fs.LinkSettings(latency_ms=30.0, attr_timeout=0)):
        fd = os.open(mnt / "c" / "x.bin", os.O_RDONLY)   # lookups of c/, x.bin, then the open: >= 3 trips
        try:
            t0 = time.perf_counter()
            os.pread(fd, 10, 0)
            assert time.perf_counter() - t0 >= 0.030
        finally:
            os.close(fd)
    with latency_fs.mounted(str(src), str(mnt), latency_fs.LinkSettings(bandwidth_mbps=3.0)):
        names = [mnt / "c" / "x.bin", mnt / "c" / "y.bin"]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:   # 2 x 300 kB at 3 MB/s: 0.2 s when they share the link
            assert list(pool.map(lambda p: p.read_bytes(), names)) == [data, data]
        assert time.perf_counter() - t0 >= 0.19


@pytest.mark.slow
@needs_fuse
def test_mount_of_a_killed_process_goes_away(tree):
    src, mnt, _ = tree
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from benchmarks import latency_fs; "
            "cm = latency_fs.mounted(sys.argv[2], sys.argv[3], latency_fs.LinkSettings()); cm.__enter__(); "
            "print('up', flush=True); time.sleep(60)")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen([sys.executable, "-c", code, repo, str(src), str(mnt)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "up" and os.path.ismount(mnt)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    deadline = time.monotonic() + 10
    while os.path.ismount(mnt) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.ismount(mnt)
