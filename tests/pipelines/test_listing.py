"""list_images, file lists, subsets, backend choice and prepare_batch."""
import os
import re
from types import SimpleNamespace

import pytest
import torch

import pipelines
import pipelines.scan
from pipelines import list_images, prepare_batch, resolve_backend, resolve_file_list, subset_per_class
from pipelines.listing import read_file_list, write_file_list
from rotnet.cli import InputError
from rotnet.distributed import DistInfo
from tests.pipelines.images import cfg, make_folder, needs_dali


def test_list_images_layout(tmp_path):
    root = make_folder(tmp_path / "train", [2, 0, 3])
    os.makedirs(os.path.join(root, "c1"))  # an empty class folder
    open(os.path.join(root, "c0", "readme.txt"), "w").close()
    open(os.path.join(root, "c0", ".hidden.jpg"), "w").close()
    with pytest.warns(UserWarning, match="c1"):
        paths, labels, classes = list_images(root)
    assert classes == ["c0", "c1", "c2"]           # empty class keeps its index
    assert labels == [0, 0, 2, 2, 2]
    assert all(os.path.isabs(p) and p.endswith(".JPEG") for p in paths)
    assert "img 0 é.JPEG" in os.path.basename(paths[0])


def test_list_images_errors(tmp_path):
    with pytest.raises(pipelines.SplitLayoutError, match="image folder not found.*nowhere"):
        list_images(str(tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(pipelines.BadImageError, match="no class folders"):
        list_images(str(tmp_path / "flat"))


def test_file_list_roundtrip_with_spaces(tmp_path):
    path = str(tmp_path / "l.txt")
    write_file_list(path, ["a b/c d.JPEG", "x/ü.jpg"], [3, 0])
    assert read_file_list(path) == (["a b/c d.JPEG", "x/ü.jpg"], [3, 0])
    root = make_folder(tmp_path / "train", [1, 1])
    paths, labels, classes = list_images(root, path)
    assert paths[0] == os.path.join(root, "a b/c d.JPEG") and labels == [3, 0] and classes == ["c0", "c1"]


def test_file_list_errors_are_input_errors_naming_the_file(tmp_path):
    """Missing, malformed or unwritable file lists: one-line InputErrors naming the path, never a
    bare OSError/ValueError (the CLIs print InputErrors and nothing else as one line)."""
    with pytest.raises(InputError, match="cannot read the file list .*nope.txt"):
        read_file_list(str(tmp_path / "nope.txt"))
    (tmp_path / "bad.txt").write_text("a/b.jpg 1\nno-label-here\n")
    with pytest.raises(InputError, match=r"bad\.txt:2: expected 'relative/path label'"):
        read_file_list(str(tmp_path / "bad.txt"))
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(InputError, match="cannot write the file list .*blocker"):
        write_file_list(str(tmp_path / "blocker" / "l.txt"), ["a.jpg"], [0])


def test_resolve_file_list():
    assert resolve_file_list("lists/{split}.txt", "/d/val", "train") == "lists/val.txt"
    assert resolve_file_list("lists/all.txt", "/d/train/", "train") == "lists/all.txt"
    assert resolve_file_list("lists/all.txt", "/d/val", "train") == ""  # train-only list
    assert resolve_file_list("", "/d/train", "train") == ""


def test_subset_per_class():
    labels = [0] * 10 + [1] * 4 + [2] * 7
    a = subset_per_class(labels, 5, seed=0)
    assert a == subset_per_class(labels, 5, seed=0) and a != subset_per_class(labels, 5, seed=1)
    picked = [labels[i] for i in a]
    assert picked.count(0) == 5 and picked.count(2) == 5 and picked.count(1) == 4  # class 1 has only 4


def test_resolve_backend(monkeypatch):
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") in ("dali", "torch")
    monkeypatch.setattr(pipelines.scan, "dali_available", lambda: False)
    assert resolve_backend("auto") == "torch"
    with pytest.raises(InputError, match="nvidia.dali"):
        resolve_backend("dali")
    with pytest.raises(ValueError):
        resolve_backend("tf")


def test_prepare_batch_uint8():
    d = cfg().data
    x = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    y = prepare_batch(x, d, channels_last=True)
    mean = torch.tensor(d.mean).view(1, 3, 1, 1)
    std = torch.tensor(d.std).view(1, 3, 1, 1)
    ref = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert y.shape == (2, 3, 5, 6) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert prepare_batch(x, d, channels_last=False).is_contiguous()


def test_prepare_batch_float_passthrough():
    z = torch.randn(2, 3, 4, 4).half()
    out = prepare_batch(z, cfg().data, channels_last=True, dtype=None)  # None: keep the loader's dtype
    assert out.dtype == torch.float16 and torch.equal(out, z)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "torch"])
def test_graph_normalisation_on_cpu(square_split, backend):
    """loader.normalize=graph: float16 (B, C, H, W) normalised by the loader, same values as prepare_batch."""
    kw = dict(backend=backend, rotations=[0, 180])
    lo_u8 = pipelines.build_rotation_loader(cfg(**kw), square_split, batch_size=2, train=False, seed=0)
    lo_f16 = pipelines.build_rotation_loader(cfg(normalize="graph", **kw), square_split, batch_size=2,
                                             train=False, seed=0)
    x8, y8 = next(iter(lo_u8))
    x16, y16 = next(iter(lo_f16))
    assert x16.dtype == torch.float16 and x16.shape == (4, 3, 32, 32) and torch.equal(y8, y16)
    torch.testing.assert_close(x16.float(), prepare_batch(x8, cfg().data, False), atol=2e-2, rtol=1e-2)


def test_path_table_gives_back_every_path(tmp_path):
    """PathTable (a loader's spec.paths) returns the listed paths, odd names included, by index,
    negative index and slice; `root` + `relative(i)` is the path (DALI's file_root and files)."""
    from pipelines.listing import PathTable

    odd = os.fsdecode(b"c1/bad \xff name.JPEG")          # undecodable byte, as os.walk gives it
    paths = [str(tmp_path / "s" / p) for p in ("c0/a b é.jpg", "c0/z.jpg", odd, "c1/x.png")]
    table = PathTable(paths)
    assert len(table) == 4 and list(table) == paths and table[-1] == paths[-1] and table[1:3] == paths[1:3]
    assert table.root == str(tmp_path / "s") + "/" and table.root + table.relative(2) == paths[2]
    with pytest.raises(IndexError):
        table[4]
    assert len(PathTable([])) == 0


def test_a_newline_in_a_name_cannot_go_in_a_file_list(tmp_path):
    """One line rule for our lists and DALI's: a name with a newline is refused, nothing written."""
    from pipelines.listing import BadImageError, file_list_lines, write_file_list

    assert list(file_list_lines(["c0/a.jpg", "c1/b c.jpg"], [0, 1])) == ["c0/a.jpg 0\n", "c1/b c.jpg 1\n"]
    with pytest.raises(BadImageError, match="newline"):
        write_file_list(str(tmp_path / "l.txt"), ["c0/a.jpg", "c0/b\n.jpg"], [0, 0])
    assert not (tmp_path / "l.txt").exists()


def test_a_symlink_loop_is_listed_once_with_one_warning(tmp_path):
    root = make_folder(tmp_path / "train", [2, 3])
    plain = list_images(root)
    os.symlink("..", os.path.join(root, "c0", "up"))              # back to the split: a loop
    os.symlink("../..", os.path.join(root, "c1", "top"))          # to the data set root, above the split
    with pytest.warns(UserWarning, match=r"symlink loop .*2 folder\(s\).*c0/up -> ") as caught:
        looped = list_images(root)
    assert len(caught) == 1 and looped == plain


def test_symlinked_class_folders_and_files_are_followed(tmp_path):
    real = make_folder(tmp_path / "real", [2, 1])
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    os.symlink(os.path.join(real, "c0"), root / "b")              # a linked class folder
    os.symlink(os.path.join(real, "c1", os.listdir(os.path.join(real, "c1"))[0]), root / "a" / "x.jpg")
    paths, labels, classes = list_images(str(root))
    assert classes == ["a", "b"] and labels == [0, 1, 1] and all(os.path.isfile(p) for p in paths)


def test_a_zero_byte_file_is_named_with_or_without_a_file_list(tmp_path):
    root = make_folder(tmp_path / "train", [2, 2])
    empty = os.path.join(root, "c1", "empty.JPEG")
    open(empty, "w").close()
    with pytest.raises(InputError, match=rf"empty \(0-byte\) image file: {empty}; remove it"):
        list_images(root)
    write_file_list(str(tmp_path / "list.txt"), ["c1/empty.JPEG"], [1])
    with pytest.raises(InputError, match=rf"empty \(0-byte\) image file: {empty}"):
        list_images(root, str(tmp_path / "list.txt"))


def test_class_loaders_share_their_classes_or_name_both_folders(tmp_path):
    """A probe's pair: the train subset (labels_per_class) and a K-per-class val, same classes; a val
    split whose class folders differ from train's is bad input naming both folders."""
    make_folder(tmp_path / "train", [3, 3])
    make_folder(tmp_path / "val", [2, 2])
    info = DistInfo(device=torch.device("cpu"))
    c = cfg(root=str(tmp_path), backend="torch", num_threads=0)
    p = SimpleNamespace(cfg=c, info=info, batch_size=2, seed=0, labels_per_class=2)   # a probe's protocol
    train, val = pipelines.class_loaders(p, val_per_class=1)
    assert list(train.classes) == list(val.classes) == ["c0", "c1"]
    assert (train.num_samples, val.num_samples) == (4, 2)
    make_folder(tmp_path / "val", [0, 0, 1], name="extra {i}.JPEG")
    differ = re.escape(f"class folders of {tmp_path / 'train'} and {tmp_path / 'val'} differ (2 vs 3")
    with pytest.raises(InputError, match=differ):
        pipelines.class_loaders(SimpleNamespace(cfg=c, info=info, batch_size=2, seed=0, labels_per_class=0))
