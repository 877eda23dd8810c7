"""python -m pipelines.imagenet_val: a tiny flat val labelled from either label file gives, through
list_images and a class loader, the true label of every image; every mismatch is one line and
writes nothing; an earlier output is never lost."""
import os
import shutil

import numpy as np
import pytest
import torch

from pipelines import build_class_loader, list_images
from pipelines.imagenet_val import main as convert
from tests.pipelines.images import cfg, colour_of, save_jpeg

# The devkit numbers synsets in its own order (ID 1 = n02119789 kit fox), not sorted by wnid.
DEVKIT = ["n02119789", "n02100735", "n01440764"]            # ILSVRC2012_ID 1, 2, 3
TRAIN = sorted(DEVKIT)                                       # class index = sorted train folders
TRUTH = ["n01440764", "n02119789", "n02119789", "n02100735", "n01440764", "n02100735"]  # val image k+1


@pytest.fixture
def imagenet(tmp_path):
    """ROOT/train/<wnid>/x.JPEG, ROOT/val/ILSVRC2012_val_0000000K.JPEG (image k-1 solid colour_of(k-1),
    so a crop says which image it is), and both label files plus the devkit's synset maps."""
    root = tmp_path / "imagenet"
    for w in TRAIN:
        save_jpeg(str(root / "train" / w / "x.JPEG"), np.full((40, 40, 3), 128, np.uint8))
    for k in range(len(TRUTH)):
        save_jpeg(str(root / "val" / f"ILSVRC2012_val_{k + 1:08d}.JPEG"),
                  np.full((40, 44, 3), colour_of(k), np.uint8))
    files = {"gt": "\n".join(str(DEVKIT.index(w) + 1) for w in TRUTH) + "\n",
             "csv": "ImageId,PredictionString\n" + "".join(   # rows in any order, several boxes per image
                 f"ILSVRC2012_val_{k + 1:08d},{TRUTH[k]} 1 2 30 40 {TRUTH[k]} 5 6 7 8 \n"
                 for k in (3, 0, 5, 1, 4, 2)),
             "map_clsloc": "".join(f"{w} {i + 1} name_{i}\n" for i, w in enumerate(DEVKIT)),
             "wnids": "".join(f"{w}\n" for w in DEVKIT),
             "sorted": "".join(f"{w} some words, more\n" for w in TRAIN)}
    for name, text in files.items():
        (tmp_path / f"{name}.txt").write_text(text)
    return root


def run(tmp_path, root, labels, *extra, synsets=None, out="val_classes"):
    args = [str(root / "val"), "--labels", str(tmp_path / f"{labels}.txt"),
            "--train-dir", str(root / "train"), "--out", str(root / out), *extra]
    return convert(args + (["--synsets", str(tmp_path / f"{synsets}.txt")] if synsets else []))


def one_line_error(capsys, *args, **kw) -> str:
    with pytest.raises(SystemExit) as e:
        run(*args, **kw)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def loader_labels_by_image(d, split):
    """{val image index: class index} read through a torch class loader (eval recipe, in order)."""
    lo = build_class_loader(d, split, batch_size=4, train=False, seed=0)
    assert list(lo.classes) == TRAIN
    found = {}
    palette = torch.tensor([colour_of(k) for k in range(len(TRUTH))], dtype=torch.float32)
    for x, y in lo:                                          # (B, H, W, 3) uint8 solid crops
        means = x.float().mean(dim=(1, 2))
        for k, label in zip(torch.cdist(means, palette).argmin(1).tolist(), y.tolist()):
            found[k] = label
    return found


TRUE_INDEX = {k: TRAIN.index(w) for k, w in enumerate(TRUTH)}


@pytest.mark.parametrize("labels,synsets", [("csv", None), ("gt", "map_clsloc"), ("gt", "wnids")])
def test_symlink_tree_gives_the_true_labels(tmp_path, imagenet, labels, synsets, capsys):
    assert run(tmp_path, imagenet, labels, synsets=synsets) == 0
    assert "next: set data.val_dir=val_classes" in capsys.readouterr().out
    out = imagenet / "val_classes"
    paths, got, classes = list_images(str(out))
    assert classes == TRAIN and len(paths) == len(TRUTH)
    assert all(os.path.islink(p) and not os.path.isabs(os.readlink(p)) for p in paths)   # relative links
    truth = {f"ILSVRC2012_val_{k + 1:08d}.JPEG": TRAIN.index(w) for k, w in enumerate(TRUTH)}
    assert {os.path.basename(p): lab for p, lab in zip(paths, got)} == truth
    assert loader_labels_by_image(cfg(backend="torch"), str(out)) == TRUE_INDEX


def test_file_list_gives_the_true_labels(tmp_path, imagenet, capsys):
    assert run(tmp_path, imagenet, "csv", "--mode", "list", out="lists") == 0
    assert f"data.file_list={imagenet / 'lists'}/{{split}}.txt" in capsys.readouterr().out
    assert (imagenet / "lists" / "train.txt").read_text().splitlines() == [f"{w}/x.JPEG {i}" for i, w in
                                                                          enumerate(TRAIN)]
    d = cfg(backend="torch", root=str(imagenet), file_list=str(imagenet / "lists" / "{split}.txt"))
    paths, got, classes = list_images(str(imagenet / "val"), str(imagenet / "lists" / "val.txt"),
                                      class_dir=str(imagenet / "train"))
    assert classes == TRAIN and got == [TRUE_INDEX[k] for k in range(len(TRUTH))]
    # the flat val, through the list
    assert loader_labels_by_image(d, str(imagenet / "val")) == TRUE_INDEX


@pytest.mark.parametrize("labels,synsets,edit,expected", [
    ("csv", None, lambda t: t.replace("ILSVRC2012_val_00000006,", "ILSVRC2012_val_00000099,"),
     ["csv.txt:4: a label for ILSVRC2012_val_00000099, but", "has no such image (6 labels, 6 images)"]),
    ("csv", None, lambda t: "\n".join(t.splitlines()[:-1]),                # one row fewer
     ["ILSVRC2012_val_00000003.JPEG has no label in", "csv.txt (5 labels, 6 images)"]),
    ("csv", None, lambda t: t.replace("n02100735 1", "n09999999 1"),
     ["csv.txt:2: n09999999 (label of ILSVRC2012_val_00000004) is not a class folder of",
      "(and 1 more like it)"]),
    ("csv", None, lambda t: t + "ILSVRC2012_val_00000001,n01440764\n",
     ["csv.txt:8: ILSVRC2012_val_00000001 again"]),
    ("csv", None, lambda t: "ImageId;PredictionString\n", ["csv.txt:1: expected the header"]),
    ("gt", "map_clsloc", lambda t: t + "1\n", ["gt.txt:7: a label for ILSVRC2012_val_00000007, but",
                                               "(7 labels, 6 images)"]),
    ("gt", "map_clsloc", lambda t: t.replace("3\n", "4\n", 1),
     ["gt.txt:1: expected an ILSVRC2012_ID in 1..3"]),
])
def test_mismatches_are_one_line_and_write_nothing(tmp_path, imagenet, capsys, labels, synsets, edit,
                                                   expected):
    path = tmp_path / f"{labels}.txt"
    path.write_text(edit(path.read_text()))
    err = one_line_error(capsys, tmp_path, imagenet, labels, synsets=synsets)
    for text in expected:
        assert text in err, err
    assert sorted(os.listdir(imagenet)) == ["train", "val"]               # no OUT, no leftovers


@pytest.mark.parametrize("synsets,expected", [
    (None, "holds ILSVRC2012_IDs (devkit ground truth): give --synsets"),
    ("sorted", "lists the wnids in sorted order"),                        # LOC_synset_mapping.txt-like
])
def test_ground_truth_needs_the_devkit_order(tmp_path, imagenet, capsys, synsets, expected):
    assert expected in one_line_error(capsys, tmp_path, imagenet, "gt", synsets=synsets)


def test_val_with_class_folders_is_left_alone(tmp_path, imagenet, capsys):
    assert run(tmp_path, imagenet, "csv") == 0
    capsys.readouterr()
    args = [str(imagenet / "val_classes"), "--labels", str(tmp_path / "csv.txt"), "--train-dir",
            str(imagenet / "train"), "--out", str(imagenet / "again")]
    with pytest.raises(SystemExit):
        convert(args)
    assert "already has class folders" in capsys.readouterr().err


def test_earlier_output_is_never_lost(tmp_path, imagenet, capsys):
    out = imagenet / "val_classes"
    assert run(tmp_path, imagenet, "csv") == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert "--force" in one_line_error(capsys, tmp_path, imagenet, "csv")          # no --force: refused
    (tmp_path / "csv.txt").write_text("ImageId,PredictionString\n")              # bad input with --force
    assert "has no label" in one_line_error(capsys, tmp_path, imagenet, "csv", "--force")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(os.listdir(imagenet)) == ["train", "val", "val_classes"]       # no half-written sibling
    assert run(tmp_path, imagenet, "gt", "--force", synsets="map_clsloc") == 0   # good input: replaced
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    (imagenet / "mine").mkdir()
    (imagenet / "mine" / "notes.txt").write_text("keep me")
    assert "not written by this command" in one_line_error(capsys, tmp_path, imagenet, "csv", "--force",
                                                           out="mine")
    assert (imagenet / "mine" / "notes.txt").read_text() == "keep me"
    assert "overlaps" in one_line_error(capsys, tmp_path, imagenet, "csv", "--force", out="val/x")


@pytest.mark.parametrize("labels,synsets", [("csv", None), ("gt", "map_clsloc")])
def test_subset_train_keeps_its_classes_only(tmp_path, imagenet, capsys, labels, synsets):
    """ImageNet-100 style: train/ holds 2 of the 3 classes; --subset keeps their val images, with
    class indices of the subset's own sorted folders; without it, one line pointing at --subset."""
    gone = "n02100735"
    shutil.rmtree(imagenet / "train" / gone)
    kept = [w for w in TRAIN if w != gone]
    err = one_line_error(capsys, tmp_path, imagenet, labels, synsets=synsets)
    assert "--subset keeps only its classes" in err
    assert sorted(os.listdir(imagenet)) == ["train", "val"]
    assert run(tmp_path, imagenet, labels, "--subset", synsets=synsets) == 0
    printed = capsys.readouterr().out
    assert "4 images of 2/2 classes" in printed and "2 images of other classes skipped" in printed, printed
    paths, got, classes = list_images(str(imagenet / "val_classes"))
    truth = {f"ILSVRC2012_val_{k + 1:08d}.JPEG": kept.index(w) for k, w in enumerate(TRUTH) if w != gone}
    assert classes == kept and {os.path.basename(p): lab for p, lab in zip(paths, got)} == truth


def test_subset_refuses_a_train_class_without_val_images(tmp_path, imagenet, capsys):
    (imagenet / "train" / "n09999999").mkdir()
    save_jpeg(str(imagenet / "train" / "n09999999" / "x.JPEG"), np.full((40, 40, 3), 128, np.uint8))
    err = one_line_error(capsys, tmp_path, imagenet, "csv", "--subset")
    assert "--subset: class folder n09999999 of" in err and "has no image in" in err, err
    assert sorted(os.listdir(imagenet)) == ["train", "val"]
