"""benchmarks/imagenet_tree.py at scale 1/100: ImageNet's layout and counts, every file a hard link,
the val CSV read back by `pipelines.imagenet_val` and a class loader, and a loader's coverage on
2 ranks. A pool of 8 small synthetic JPEGs keeps the tree cheap (about 13,300 links)."""
import os

import pytest
import torch

from benchmarks.imagenet_tree import (
    CLASSES,
    TRAIN_TOTAL,
    class_counts,
    get_parser,
    main,
    plan,
    read_manifest,
    tree_path,
    wnids,
)
from pipelines import build_class_loader, build_rotation_loader, list_images
from pipelines.imagenet_val import main as convert
from rotnet.distributed import DistInfo
from tests.pipelines.images import cfg, make_folder

SCALE = 0.01


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("scale")
    pool = make_folder(base / "pool", [4, 4], size=(40, 40))
    argv = ["--scale", "1/100", "--out", str(base / "trees"), "--pool", pool, "--pool-count", "8",
            "--pool-px", "64"]
    assert main(argv) == 0
    return tree_path(str(base / "trees"), SCALE), argv


def test_class_counts_have_imagenets_total_and_range():
    counts = class_counts()
    assert len(counts) == CLASSES and sum(counts) == TRAIN_TOTAL == 1_281_167
    assert min(counts) == 732 and max(counts) == 1300
    assert counts == class_counts() and counts != class_counts(seed=1)     # seeded, fixed
    names = wnids()
    assert names == sorted(set(names)) and len(names) == CLASSES and all(len(w) == 9 for w in names)


def test_layout_and_counts(tree):
    root, _ = tree
    names, train, val = plan(SCALE, 0)
    assert sorted(os.listdir(os.path.join(root, "train"))) == names
    for w, n in list(zip(names, train))[::97]:
        names_in = sorted(os.listdir(os.path.join(root, "train", w)))
        assert names_in == sorted(f"{w}_{k}.JPEG" for k in range(1, n + 1))
    paths, labels, classes = list_images(os.path.join(root, "train"))
    assert len(paths) == sum(train) and abs(len(paths) - TRAIN_TOTAL * SCALE) < CLASSES
    assert classes == names and labels[-1] == CLASSES - 1
    flat = sorted(os.listdir(os.path.join(root, "val")))
    assert flat == [f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, 501)] and len(val) == 500
    pool = {os.stat(os.path.join(root, ".pool", f)).st_ino for f in os.listdir(os.path.join(root, ".pool"))}
    assert len(pool) == 8
    for p in paths[::501] + [os.path.join(root, "val", flat[0])]:
        assert os.stat(p).st_ino in pool                                      # a hard link, no bytes


def test_val_csv_through_imagenet_val_and_a_class_loader(tree, tmp_path):
    root, _ = tree
    names, _, val = plan(SCALE, 0)
    out = tmp_path / "val-classes"
    assert convert([os.path.join(root, "val"), "--labels", os.path.join(root, "LOC_val_solution.csv"),
                    "--train-dir", os.path.join(root, "train"), "--out", str(out)]) == 0
    with pytest.warns(UserWarning, match="without images"):                  # 500 images, 1,000 classes
        paths, labels, classes = list_images(str(out))
    truth = {f"ILSVRC2012_val_{k:08d}.JPEG": names.index(w) for k, w in enumerate(val, 1)}
    assert classes == names and len(paths) == 500
    assert all(truth[os.path.basename(p)] == lab for p, lab in zip(paths, labels))
    with pytest.warns(UserWarning, match="without images"):
        loader = build_class_loader(cfg(backend="torch", num_threads=0), str(out), batch_size=8,
                                    train=False, seed=0)
    images, y = next(iter(loader))
    assert images.shape == (8, 32, 32, 3) and y.tolist() == labels[:8]


@pytest.mark.parametrize("train", [True, False])
def test_rotation_loader_covers_the_split_on_two_ranks(tree, train):
    root, _ = tree
    split = os.path.join(root, "train")
    n = len(list_images(split)[0])
    loaders = [build_rotation_loader(cfg(backend="torch", num_threads=0), split, batch_size=16,
                                     info=DistInfo(rank=r, world_size=2), train=train, seed=0)
               for r in (0, 1)]
    parts = [set(ld.sampler.indices()) for ld in loaders]
    assert not parts[0] & parts[1]
    assert len(loaders[0]) == len(loaders[1]) or not train
    if train:   # floor(n / 2) per rank, cut to whole batches of 16
        assert all(len(p) == (n // 2) // 16 * 16 for p in parts)
    else:       # every image once
        assert parts[0] | parts[1] == set(range(n))
    images, labels = next(iter(loaders[1]))
    assert images.shape == (4 * 16, 32, 32, 3) and labels.tolist() == [0, 1, 2, 3] * 16
    assert isinstance(images, torch.Tensor)


def test_rebuild_reuses_and_remove_refuses_foreign_folders(tree, tmp_path, capsys):
    root, argv = tree
    stamp = os.stat(os.path.join(root, "train")).st_mtime_ns
    assert main(argv) == 0 and os.stat(os.path.join(root, "train")).st_mtime_ns == stamp
    assert read_manifest(root)["scale"] == SCALE
    foreign = tmp_path / "scale-0.01"
    foreign.mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--scale", "0.01", "--out", str(tmp_path), "--remove"])
    assert e.value.code == 2 and foreign.is_dir() and "not made by this script" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        get_parser().parse_args(["--scale", "2"])
