"""Flat splits (SPLIT/IMAGE, ImageNet's val as extracted): rotation loaders read them, class loaders
and the scan refuse what they cannot label, naming the fix; mixed layouts are refused everywhere."""
import os

import pytest
import torch

from pipelines import (
    SplitLayoutError,
    build_class_loader,
    build_rotation_loader,
    class_labels_missing,
    list_images,
)
from pipelines.listing import CLASSES, EMPTY, FLAT, MIXED, split_layout
from pipelines.scan import main as scan_main
from rotnet.cli import InputError
from tests.pipelines.images import KINDS, cfg, make_folder, save_jpeg, textured

CPU = torch.device("cpu")
LOADER = dict(batch_size=2, seed=0)


def make_flat(root, n, seed=1):
    """ROOT/ILSVRC2012_val_0000000K.JPEG, K = 1..n, as the val tar extracts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for k in range(1, n + 1):
        save_jpeg(os.path.join(root, f"ILSVRC2012_val_{k:08d}.JPEG"), textured(rng, 40, 40))
    return str(root)


def test_split_layout(tmp_path):
    assert split_layout(make_folder(tmp_path / "classes", [1, 1])) == CLASSES
    assert split_layout(make_flat(tmp_path / "flat", 2)) == FLAT
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)           # hidden entries do not count
    assert split_layout(str(tmp_path / "empty")) == EMPTY
    mixed = make_folder(tmp_path / "mixed", [1])
    make_flat(mixed, 1)
    assert split_layout(mixed) == MIXED
    with pytest.raises(SplitLayoutError, match="image folder not found.*nowhere"):
        split_layout(str(tmp_path / "nowhere"))


def test_flat_split_listing(tmp_path):
    flat = make_flat(tmp_path / "val", 3)
    open(os.path.join(flat, "readme.txt"), "w").close()
    paths, labels, classes = list_images(flat, labelled=False)
    assert [os.path.basename(p) for p in paths] == [f"ILSVRC2012_val_{k:08d}.JPEG" for k in (1, 2, 3)]
    assert labels == [0, 0, 0] and classes == []
    with pytest.raises(SplitLayoutError, match="without class folders.*pipelines.imagenet_val"):
        list_images(flat)
    assert isinstance(SplitLayoutError("x"), InputError)               # entry points end it in one line


@pytest.mark.parametrize("kind", KINDS)
def test_rotation_loader_reads_a_flat_split(tmp_path, kind):
    flat = make_flat(tmp_path / "val", 5)
    d = cfg(**kind[1])
    lo = build_rotation_loader(d, flat, train=False, **LOADER)
    assert lo.num_samples == 5 and lo.classes == []
    batches = list(lo)
    assert sum(len(y) for _, y in batches) == 5 * 4                     # every image, 4 rotations each
    assert batches[0][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]           # rotation labels, not classes


def test_class_loader_refuses_a_flat_or_mixed_split(tmp_path):
    flat = make_flat(tmp_path / "val", 2)
    with pytest.raises(SplitLayoutError, match=f"'{flat}' holds images without class folders"):
        build_class_loader(cfg(backend="torch"), flat, train=False, **LOADER)
    mixed = make_folder(tmp_path / "mixed", [2])
    make_flat(mixed, 1)
    for build in (build_class_loader, build_rotation_loader):
        with pytest.raises(SplitLayoutError, match="both loose images and sub-folders"):
            build(cfg(backend="torch"), mixed, train=False, **LOADER)


def test_class_labels_missing(tmp_path):
    d = cfg().data
    assert class_labels_missing(d, make_folder(tmp_path / "train", [1])) == ""
    assert "does not exist" in class_labels_missing(d, str(tmp_path / "nowhere"))
    flat = make_flat(tmp_path / "val", 1)
    assert "python -m pipelines.imagenet_val" in class_labels_missing(d, flat)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 0\n")
    # the list labels it
    assert class_labels_missing(cfg(file_list=str(lists / "{split}.txt")).data, flat) == ""


# ---------------------------------------------------------------------------- the scan never guesses

def test_scan_refuses_a_root_of_class_and_flat_splits(tmp_path, capsys):
    make_folder(tmp_path / "data" / "train", [1, 1])
    make_flat(tmp_path / "data" / "val", 2)
    with pytest.raises(SystemExit) as e:
        scan_main([str(tmp_path / "data"), "--out", str(tmp_path / "lists" / "{split}.txt"),
                   "--workers", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mixes splits of class folders (train)" in err
    assert "loose images (val)" in err and "pipelines.imagenet_val" in err
    assert not (tmp_path / "lists").exists()                          # refused before writing anything


def test_scan_refuses_flat_folders_named_like_splits(tmp_path, capsys):
    make_flat(tmp_path / "data" / "train", 1)
    make_flat(tmp_path / "data" / "val", 1)
    with pytest.raises(SystemExit):
        scan_main([str(tmp_path / "data"), "--out", str(tmp_path / "l{split}.txt"), "--workers", "1"])
    assert "named like splits" in capsys.readouterr().err and not list(tmp_path.glob("l*"))


def test_scan_checks_a_flat_split_but_writes_no_labels(tmp_path, capsys):
    flat = make_flat(tmp_path / "val", 3)
    with open(os.path.join(flat, "ILSVRC2012_val_00000009.JPEG"), "wb") as f:
        f.write(b"not a JPEG")
    assert scan_main([flat, "--out", str(tmp_path / "{split}.txt"), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "BAD " in out and "ILSVRC2012_val_00000009.JPEG" in out and "3 good, 1 bad" in out
    assert "no file list for a flat split" in out and not (tmp_path / "val.txt").exists()


def test_scan_mixed_split_and_missing_root_are_one_line(tmp_path, capsys):
    mixed = make_folder(tmp_path / "mixed", [1])
    make_flat(mixed, 1)
    for root in (mixed, str(tmp_path / "nonexistent")):
        with pytest.raises(SystemExit) as e:
            scan_main([root, "--workers", "1", "--out", str(tmp_path / "x.txt")])
        assert e.value.code == 2 and root in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()
