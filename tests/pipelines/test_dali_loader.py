"""The DALI loader (pipelines/dali_loader.py): its GPU-facing choices checked on CPU (decoder arguments);
its feed: many reads in flight, yet the same batches in the same order; a failed read or an undecodable
image is named in one line."""
import os
import re
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import pipelines.dali_loader
from pipelines import BadImageError, build_class_loader, build_rotation_loader
from rotnet.cli import InputError
from rotnet.distributed import DistInfo
from tests.pipelines.images import FORMATS, cfg, in_format, make_folder, needs_dali, save_jpeg, textured

pytestmark = needs_dali


def test_decoder_paddings_default_to_dali_and_stay_off_validation():
    from pipelines.dali_loader import mixed_decoder_args

    assert mixed_decoder_args(cfg().loader, train=True) == {"hw_decoder_load": 0.65}  # DALI's own defaults
    big = cfg(device_memory_padding=64 << 20, host_memory_padding=32 << 20)
    assert mixed_decoder_args(big.loader, train=True) == {"hw_decoder_load": 0.65,
                                                          "device_memory_padding": 64 << 20,
                                                          "host_memory_padding": 32 << 20}
    assert mixed_decoder_args(big.loader, train=False) == {"hw_decoder_load": 0.65}


@pytest.mark.parametrize("message", ["CUDA error: out of memory",
                                     "Error in MIXED operator `nvidia.dali.fn.decoders.image`: nvImageCodec "
                                     "failure: '#10'"])
def test_non_decode_error_is_raised_as_is_without_a_scan(square_split, monkeypatch, message):
    """An out-of-memory (or a missing library) is not a bad image: no BadImageError, no file decoded."""
    from nvidia.dali.pipeline import Pipeline

    def fail(pipe, *args):
        # no reference to the pipeline in the traceback: freed later by the garbage collector in a
        # forked DataLoader worker (of a later test), DALI's shutdown deadlocks there
        del pipe
        raise RuntimeError(message)

    monkeypatch.setattr(Pipeline, "run", fail)
    monkeypatch.setattr(pipelines.dali_loader, "dali_verdicts",
                        lambda *a: pytest.fail("decoded the files in flight"))
    lo = build_rotation_loader(cfg(backend="dali"), square_split, batch_size=2, train=True, seed=0)
    with pytest.raises(RuntimeError) as info:
        next(iter(lo))
    assert not isinstance(info.value, BadImageError) and str(info.value) == message


CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("feed") / "train", [5, 4, 4], size=(40, 48))


def loader(root, fmt="folder", train=True, rank=0, **kw):
    return build_rotation_loader(cfg(backend="dali", format=fmt, **kw), root, batch_size=3,
                                 info=DistInfo(rank=rank, world_size=2), train=train, seed=3)


def slow_reads(monkeypatch):
    """Reads that finish out of order: the later a sample's index, the sooner its read returns."""
    done = []
    plain = pipelines.dali_loader.read_sample

    def read(spec, j):
        time.sleep(0.004 * ((len(spec.paths) - j) % 5))
        done.append(j)
        return plain(spec, j)

    monkeypatch.setattr(pipelines.dali_loader, "read_sample", read)
    return done


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_out_of_order_reads_give_the_same_batches(split, monkeypatch, fmt, train):
    root = in_format(split, fmt)
    one = loader(root, fmt, train, reads_in_flight=1)
    expected_bytes = [[bytes(b) for b in step] for step in one.read_only_batches(range(2))]
    expected = [(x.clone(), y.clone()) for e in range(2) if one.set_epoch(e) is None for x, y in one]

    done = slow_reads(monkeypatch)
    many = loader(root, fmt, train, reads_in_flight=8)
    got_bytes = [[bytes(b) for b in step] for step in many.read_only_batches(range(2))]
    assert got_bytes == expected_bytes
    order = done[:]
    got = [(x.clone(), y.clone()) for e in range(2) if many.set_epoch(e) is None for x, y in many]
    assert len(got) == len(expected) == 2 * len(one)
    for (xa, ya), (xb, yb) in zip(expected, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert order != sorted(order) and len(set(order)) > 3    # the reads did finish out of order


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 20) + 3])
def test_read_file_reads_whole_files_with_one_read_request(tmp_path, monkeypatch, size):
    """One read of fstat's size + 1 (the short read is the end of the file), however large the file;
    a file that grew after the stat (or reports no size), or a read cut short, is read on to its end."""
    from pipelines.dali_loader import read_file

    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    assert read_file(str(tmp_path / "f")) == data and reads == [size + 1]

    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 7)))   # every read cut short
    assert read_file(str(tmp_path / "f")) == data
    monkeypatch.setattr(os, "read", real_read)
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((0,) * 10))   # st_size 0, as /proc reports
    assert read_file(str(tmp_path / "f")) == data


def test_reads_in_flight_reads_at_once(split):
    """The pool keeps reads_in_flight reads going, beyond the current step (3 samples) into the next."""
    lock, now, peak = threading.Lock(), [0], [0]

    def read(j):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        return b"x"

    lo = loader(split, reads_in_flight=5)
    feed = pipelines.dali_loader.Feed(lo.spec, len(lo), read=read)
    assert [len(feed(i)[0]) for i in range(3)] == [3, 3, 3]
    feed.close()
    assert peak[0] == 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_only_batches_are_the_samples_of_each_step(split, fmt):
    """Per step, the encoded bytes of the samples that rank reads, every sample once over both ranks."""
    root = in_format(split, fmt)
    seen = []
    for rank in range(2):
        lo = loader(root, fmt, train=False, rank=rank)
        steps = list(lo.read_only_batches([0]))
        assert len(steps) == len(lo) and all(s[0].dtype.name == "uint8" for s in steps)
        seen += [bytes(b) for s in steps for b in s]
    spec = loader(root, fmt, train=False).spec
    assert seen == [pipelines.dali_loader.read_sample(spec, j) for j in range(len(spec.paths))]


def test_a_failed_read_in_flight_is_named_in_one_line(tmp_path):
    """A file gone after listing, read ahead of its step: one line naming it, at the step it is in."""
    root = make_folder(tmp_path / "train", [4, 4])
    lo = build_class_loader(cfg(backend="dali", reads_in_flight=16), root, batch_size=2, train=False, seed=0)
    gone = lo.spec.paths[5]
    os.remove(gone)
    it = iter(lo)
    assert [len(next(it)[1]) for _ in range(2)] == [2, 2]   # steps 0, 1 come; step 2 (files 4, 5) fails
    with pytest.raises(BadImageError) as e:
        next(it)
    assert str(e.value) == f"cannot read {gone!r}: No such file or directory"


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_and_unreadable_members_are_named(tmp_path, monkeypatch, fmt):
    root = in_format(make_folder(tmp_path / "train", [3, 3]), fmt)
    lo = build_class_loader(cfg(backend="dali", format=fmt), root, batch_size=6, train=False, seed=0)
    name = lo.spec.paths[4]
    if fmt == "folder":
        open(name, "wb").close()
        match = "is empty (0 bytes)"
    else:
        def fail(self, i):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(type(lo.spec.shards), "read", fail)
        name, match = lo.spec.paths[0], "Input/output error"
    with pytest.raises(BadImageError, match=re.escape(f"{name!r}") + ".*" + re.escape(match)) as e:
        list(lo)
    assert "\n" not in str(e.value)


def test_a_decode_failure_names_the_file_of_its_batch(tmp_path):
    """An image whose JPEG data is cut off in a training batch: named alone, in one line."""
    root = make_folder(tmp_path / "train", [4, 4])
    bad = os.path.join(root, "c1", "img 2 é.JPEG")
    save_jpeg(bad, textured(np.random.default_rng(1), 40, 40))
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[:300] + b"\0" * 50)
    with pytest.raises(BadImageError) as e:
        list(build_rotation_loader(cfg(backend="dali"), root, batch_size=4, train=True, seed=0))
    msg = str(e.value)
    assert re.findall(r"'[^']*\.JPEG'", msg) == [repr(bad)] and "\n" not in msg


def test_one_random_in_graph_resumes_and_reads_no_unused_labels(split):
    """The full graph's one_random draws its own labels: the feed gives it images only (DALI would warn
    about an unused output) and a restored pipeline still continues with the same batches."""
    d = cfg(backend="dali", rotation_mode="one_random", dali_rotate_in_graph=True, prefetch=2)

    def build():
        return build_rotation_loader(d, split, batch_size=1, train=True, seed=1)

    a = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        it = iter(a)
        next(it)
    state = a.state_dict()
    expected = [next(it) for _ in range(2)]
    b = build()
    b.load_state_dict(state)
    got = [batch for _, batch in zip(range(2), b)]
    for (xa, ya), (xb, yb) in zip(expected, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_folder_state_of_the_earlier_dali_reader_is_refused(split):
    a = loader(split)
    next(iter(a))
    state = {k: v for k, v in a.state_dict().items() if k != "reader"}
    with pytest.raises(InputError, match="readers.file"):
        loader(split).load_state_dict(state)
