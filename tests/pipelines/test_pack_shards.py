"""Tar shards (data.format=shards): the packer (`python -m pipelines.pack_shards`) and reading what it wrote.

Coverage, exactly-once epochs and resume of shard loaders run with the folder tests
(test_sharding.py, test_state.py, parametrized over the format); here: shards of the built-in
sample set hold and give the same images as its folders, the format (manifest, DALI index), the
packer's resume, atomicity and bad input, bad members named, and train.py on shards.
"""
import collections
import hashlib
import json
import os
import re
import tarfile

import pytest
import torch

import pipelines.pack_shards as pack_shards
import visualize
from pipelines import BadImageError, build_class_loader, build_rotation_loader
from pipelines.listing import MANIFEST, list_shards, shard_files
from pipelines.pack_shards import main as shards_main
from pipelines.pack_shards import pack, shard_complete
from pipelines.sample_data import ensure_sample_data
from rotnet.cli import InputError, UsageExit
from rotnet.distributed import DistInfo
from rotnet.runlock import LOCK, FolderBusyError
from tests.pipelines.images import HAVE_DALI, KINDS, cfg, make_folder, needs_dali
from tests.tiny_run import train_in_process

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(folder root, shard root) of a small built-in sample set: 10 classes x (8 train, 4 val)."""
    base = tmp_path_factory.mktemp("sample")
    root = ensure_sample_data(seed=0, cache_dir=base / "cache", per_class_train=8, per_class_val=4)
    for split in ("train", "val"):  # several shards each; in parallel
        pack(str(root / split), str(base / "shards" / split), shard_size=30, workers=2)
    return root, base / "shards"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_samples(tar_path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a shard."""
    out = collections.defaultdict(dict)
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out[key][ext] = tf.extractfile(m).read()
    return out


def stamps(folder) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every shard file: equal stamps = the file was not rewritten."""
    return {n: (os.stat(os.path.join(folder, n)).st_ino, os.stat(os.path.join(folder, n)).st_mtime_ns)
            for n in os.listdir(folder) if n.startswith("shard-")}


# ---------------------------------------------------------------------------- what the packer writes

def test_shards_hold_the_source_bytes_and_labels(sample):
    root, shards = sample
    manifest = json.loads((shards / "train" / MANIFEST).read_text())
    classes = sorted(os.listdir(root / "train"))
    assert manifest["count"] == 80 and manifest["classes"] == classes and manifest["shard_size"] == 30
    assert manifest["source"] == str(root / "train") and manifest["tool"] == "python -m pipelines.pack_shards"
    assert manifest["version"] == 1 and manifest["tool_commit"]
    assert [e["count"] for e in manifest["shards"]] == [30, 30, 20]
    source = collections.Counter((sha((root / "train" / c / f).read_bytes()), k)
                                 for k, c in enumerate(classes) for f in os.listdir(root / "train" / c))
    packed = collections.Counter()
    for entry in manifest["shards"]:
        samples = tar_samples(shards / "train" / entry["tar"])
        labels = [int(samples[k]["cls"]) for k in sorted(samples)]
        assert labels == entry["labels"]            # the manifest's labels are the .cls members, in order
        assert len(set(labels)) > 3                 # shuffled across shards: a shard is not one class
        assert all(set(s) == {"jpg", "cls"} for s in samples.values())
        packed.update((sha(s["jpg"]), int(s["cls"])) for s in samples.values())
    assert packed == source                         # every image once, bytes unchanged, its label beside it


def test_index_is_what_wds2idx_writes(sample, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")       # DALI's tool (installed with nvidia-dali)
    _, shards = sample
    tar, idx = shard_files(1)
    with wds2idx.IndexCreator(str(shards / "train" / tar), str(tmp_path / "ref.idx"), verbose=False) as ic:
        ic.create_index()
    assert (tmp_path / "ref.idx").read_text() == (shards / "train" / idx).read_text()


@needs_dali
def test_dali_webdataset_reader_reads_the_shards(sample):
    """The shards are plain webdataset: DALI's own reader takes them with their index files."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    _, shards = sample
    names, labels, _, store = list_shards(str(shards / "val"))
    tars, idxs = zip(*(shard_files(i) for i in range(2)))

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def read():
        return tuple(fn.readers.webdataset(paths=[str(shards / "val" / t) for t in tars],
                                           index_paths=[str(shards / "val" / i) for i in idxs],
                                           ext=["jpg", "cls"], missing_component_behavior="error"))

    pipe = read()
    pipe.build()
    got = []
    for _ in range(5):
        jpg, cls = pipe.run()
        got += [(sha(np.asarray(jpg[i]).tobytes()), int(bytes(np.asarray(cls[i])))) for i in range(8)]
    assert sorted(got) == sorted((sha(store.read(i)), labels[i]) for i in range(len(names)))


# ---------------------------------------------------------------------------- reading: as the folders

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [1, 2])
def test_shards_give_the_folder_images(sample, kind, world):
    """Eval class loaders over all ranks: the same multiset of (pixels, label) as the folder, every epoch."""
    root, shards = sample

    def images(d, split, epochs):
        seen = []
        for rank in range(world):
            lo = build_class_loader(d, str(split), batch_size=7, info=DistInfo(rank=rank, world_size=world),
                                    train=False, seed=0)
            assert lo.num_samples == 40 and lo.classes == sorted(os.listdir(root / "val"))
            for epoch in range(epochs):
                lo.set_epoch(epoch)
                seen.append(collections.Counter((sha(x[i].numpy().tobytes()), int(y[i])) for x, y in lo
                                                for i in range(len(y))))
        return [sum(seen[e::epochs], collections.Counter()) for e in range(epochs)]

    _, over = kind
    (folder,) = images(cfg(**over), root / "val", 1)
    assert sum(folder.values()) == 40
    assert images(cfg(format="shards", **over), shards / "val", 2) == [folder, folder]


def test_state_of_another_format_is_refused(sample):
    root, shards = sample
    kw = dict(batch_size=4, train=True, seed=0)
    folder = build_rotation_loader(cfg(backend="torch"), str(root / "train"), **kw)
    packed = build_rotation_loader(cfg(backend="torch", format="shards"), str(shards / "train"), **kw)
    with pytest.raises(InputError, match="format='folder'"):
        packed.load_state_dict(folder.state_dict())
    old = {k: v for k, v in folder.state_dict().items() if k != "format"}  # saved before shards existed
    folder.load_state_dict(old)


def test_file_list_with_shards_is_refused(sample):
    _, shards = sample
    with pytest.raises(InputError, match="data.file_list"):
        build_class_loader(cfg(format="shards", file_list="x.txt"), str(shards / "train"), batch_size=2,
                           train=False, seed=0)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_member_is_named(tmp_path, kind):
    """A non-image and a truncated JPEG packed unchanged: the error names their shard and member
    (DALI: both, from the batches in flight; torch: the first it meets) and says how to repack."""
    root = make_folder(tmp_path / "src", [3, 3])
    good = (tmp_path / "src" / "c1" / "img 0 é.JPEG").read_bytes()
    (tmp_path / "src" / "c0" / "garbage.JPEG").write_bytes(b"<html>not a JPEG</html>" * 10)
    (tmp_path / "src" / "c1" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    pack(root, str(tmp_path / "sh"), shard_size=4, workers=1)
    names, _, _, store = list_shards(str(tmp_path / "sh"))
    bad = {n.split("/")[-1] for i, n in enumerate(names)
           if store.read(i).startswith(b"<html>") or store.read(i) == good[: len(good) // 2]}
    _, over = kind
    with pytest.raises(BadImageError, match="pipelines.pack_shards SPLIT_DIR --file-list") as e:
        list(build_class_loader(cfg(format="shards", **over), str(tmp_path / "sh"), batch_size=8,
                                train=False, seed=0))
    named = set(re.findall(r"shard-\d{6}\.tar:\d{9}\.jpg", str(e.value)))
    assert len(bad) == 2 and named and named <= bad
    if kind[0] == "dali":
        assert named == bad


# ---------------------------------------------------------------------- packer: resume, atomicity, bad input

def contents(out):
    """Every file of `out` but the lock, whose text each packer rewrites with its own pid and time."""
    return {n: (out / n).read_bytes() for n in os.listdir(out) if n != LOCK}


def test_rerun_completes_partial_pack_and_leaves_complete_shards(tmp_path):
    src = make_folder(tmp_path / "src", [4, 4, 4], size=(24, 24))
    out = tmp_path / "sh"
    pack(src, str(out), shard_size=4, workers=1)
    original = contents(out)
    before = stamps(out)
    tar1, idx1 = shard_files(1)
    tar2, _ = shard_files(2)
    (out / tar1).unlink()                               # killed before its rename
    (out / tar2).write_bytes(original[tar2][:1000])     # cut short by something else
    (out / f".tmp-{tar1}").write_bytes(b"half a shard")  # a killed writer's leftover
    (out / MANIFEST).unlink()
    pack(src, str(out), shard_size=4, workers=2)
    assert contents(out) == original   # same bytes, no leftovers
    after = stamps(out)
    kept = [n for n in before if n not in (tar1, tar2, idx1, shard_files(2)[1])]
    assert kept and all(after[n] == before[n] for n in kept)                 # complete shards untouched


def test_a_second_packer_on_a_busy_folder_is_refused_and_deletes_nothing(tmp_path):
    """A live packer (here, a process holding the folder's lock) owns --out: the second is refused
    naming it, before its cleanup deletes the temp files the first is about to rename."""
    import subprocess
    import sys

    from tests.test_train_errors import HOLD

    src = make_folder(tmp_path / "src", [4, 4], size=(24, 24))
    out = tmp_path / "sh"
    out.mkdir()
    (out / f".tmp-{shard_files(0)[0]}").write_bytes(b"a live packer's shard")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(pack_shards.__file__)))
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FolderBusyError, match=f"{out} is in use by another run"):
            pack(src, str(out), shard_size=4, workers=1)
        assert (out / f".tmp-{shard_files(0)[0]}").read_bytes() == b"a live packer's shard"
        assert not list(out.glob("shard-*"))
    finally:
        holder.kill()
        holder.wait()


def test_unreadable_file_stops_in_one_line_keeping_written_shards(tmp_path, capsys):
    """An unreadable source file: exit 2, one line naming it; shards before it are complete and kept,
    none is left half-written; once the file is readable, the rerun finishes the rest."""
    src = make_folder(tmp_path / "src", [4, 4], size=(24, 24))
    target = tmp_path / "later.JPEG"
    os.symlink(target, tmp_path / "src" / "c1" / "broken.JPEG")   # listed, but cannot be opened
    out = tmp_path / "sh"
    with pytest.raises(UsageExit):
        shards_main([src, "--out", str(out), "--shard-size", "2", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read") and "broken.JPEG" in err[0]
    written = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert not (out / MANIFEST).exists() and not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert all(shard_complete(str(out), int(n[6:12]), 2) for n in written)
    before = stamps(out)
    target.write_bytes((tmp_path / "src" / "c0" / "img 0 é.JPEG").read_bytes())
    assert shards_main([src, "--out", str(out), "--shard-size", "2", "--workers", "1"]) == 0
    assert len(json.loads((out / MANIFEST).read_text())["shards"]) == 5
    assert all(stamps(out)[n] == before[n] for n in before)


def test_a_full_disk_is_one_line_naming_the_file_and_the_bytes(tmp_path, capsys, full_disk):
    src = make_folder(tmp_path / "src", [4, 4], size=(24, 24))
    with pytest.raises(UsageExit):
        shards_main([src, "--out", str(full_disk), "--shard-size", "2", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    said = rf"error: disk full writing {full_disk}/\S+: it needs \d+ bytes, \d+ bytes free there"
    assert len(err) == 1 and re.match(said, err[0]), err
    assert not [n for n in os.listdir(full_disk) if n.startswith(".tmp-")]


def test_the_size_a_full_disk_message_gives_is_the_shards(tmp_path):
    src = make_folder(tmp_path / "src", [4, 3], size=(24, 24))
    pack(src, str(tmp_path / "sh"), shard_size=100, workers=1)
    members = pack_shards.make_plan(src, "", 100, 0)[1][0]
    assert pack_shards.planned_bytes(members) == os.path.getsize(tmp_path / "sh" / shard_files(0)[0])


@pytest.mark.parametrize("case", ["missing", "empty", "other plan", "out inside source"])
def test_bad_input_one_line(tmp_path, capsys, case):
    src = make_folder(tmp_path / "src", [2, 2], size=(24, 24))
    out = tmp_path / "sh"
    pack(src, str(out), shard_size=3, workers=1)
    kept = contents(out)
    os.makedirs(tmp_path / "empty" / "c0")
    args, expected = {
        "missing": ([str(tmp_path / "nowhere"), "--out", str(out)], "image folder not found"),
        "empty": ([str(tmp_path / "empty"), "--out", str(out)], "no image files"),
        "other plan": ([src, "--out", str(out), "--seed", "1", "--shard-size", "3"], "seed differ"),
        "out inside source": ([src, "--out", os.path.join(src, "sh")], "is inside"),
    }[case]
    capsys.readouterr()
    with pytest.raises(UsageExit):
        shards_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert contents(out) == kept       # nothing written is lost


# ---------------------------------------------------------------------------- train.py on shards

@pytest.mark.skipif(not HAVE_DALI, reason="the DALI shard feed in the trainer")
def test_train_smoke_on_shards(sample, tmp_path):
    """train.py and visualize.py on shards, run in this process (tests/tiny_run.py)."""
    _, shards = sample
    out = tmp_path / "run"
    stderr = train_in_process(["--config", "configs/sample.yaml", f"data.root={shards}", "data.format=shards",
                               "data.crop_size=64", "data.resize_size=72", "model.width=0.25",
                               "optim.batch_size_per_gpu=8", "optim.epochs=1", "train.precision=fp32",
                               f"train.output_dir={out}", "loader.num_threads=1"])
    (line,) = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert line["loss"] > 0 and 0 <= line["heldout_rot_acc"] <= 1
    assert set(line["knn_top1"]) and "monitor is off" not in stderr    # the kNN monitor reads labelled shards
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["data"]["format"] == "shards"
    # visualize.py takes its attention images from the run's val shards
    visualize.main(["--run", str(out), "--images", "2", "--out", str(tmp_path / "fig")])
    assert (tmp_path / "fig_attention.png").stat().st_size > 0


@pytest.mark.skipif(not (HAVE_DALI and torch.cuda.is_available()), reason="needs DALI and CUDA")
def test_cuda_shards_match_folder(sample):
    """GPU graph (mixed decode) fed from shards: the folder's labels, and the same crops as the folder's."""
    root, shards = sample
    gpu = torch.device("cuda", 0)
    kw = dict(batch_size=8, info=DistInfo(device=gpu), train=False, seed=0)
    a = build_class_loader(cfg(backend="dali", normalize="trainer"), str(root / "val"), **kw)
    b = build_class_loader(cfg(backend="dali", normalize="trainer", format="shards"), str(shards / "val"),
                           **kw)
    fa = sorted((int(y[i]), sha(x[i].cpu().numpy().tobytes())) for x, y in a for i in range(len(y)))
    fb = sorted((int(y[i]), sha(x[i].cpu().numpy().tobytes())) for x, y in b for i in range(len(y)))
    assert fa == fb and len(fa) == 40
    rot = build_rotation_loader(cfg(backend="dali", format="shards"), str(shards / "train"),
                                **{**kw, "train": True})
    x, y = next(iter(rot))
    assert x.device.type == "cuda" and x.dtype == torch.float16 and x.shape == (32, 3, 32, 32)
