"""Two ranks together see every file exactly once per epoch; equal training step counts. Image folders
and the tar shards they pack to (data.format) alike."""
import collections

import pytest
import torch

from pipelines import build_class_loader, build_rotation_loader
from rotnet.distributed import DistInfo
from tests.pipelines.images import FORMATS, KINDS, cfg, identify, in_format, make_colour_folder, make_folder

CPU = torch.device("cpu")


def backend_cfg(kind, **kw):
    name, over = kind
    return cfg(**over, **kw)


@pytest.fixture(scope="module")
def colour_split(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("colour") / "train", 24)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_train_rotation_loader_two_ranks_cover_all_once(colour_split, kind, fmt):
    """24 files, 2 ranks, 4 originals per step: each epoch = a permutation of all files."""
    d = backend_cfg(kind, format=fmt)
    loaders = [build_rotation_loader(d, in_format(colour_split, fmt), batch_size=4, train=True, seed=7,
                                     info=DistInfo(rank=r, world_size=2)) for r in range(2)]
    assert [len(lo) for lo in loaders] == [3, 3]
    assert all(lo.num_samples == 24 for lo in loaders)
    orders = []
    for epoch in range(2):
        seen = []
        for lo in loaders:
            lo.set_epoch(epoch)
            for x, y in lo:
                assert x.shape == (16, 32, 32, 3)
                ids = identify(x, 24)
                # the 4 rotations of one original are the same image
                assert all(len(set(ids[4 * i:4 * i + 4])) == 1 for i in range(4))
                seen.extend(ids[::4])
        assert sorted(seen) == list(range(24)), f"epoch {epoch}: {collections.Counter(seen)}"
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled every epoch


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_train_step_counts_equal_with_uneven_shards(tmp_path, kind, fmt):
    """9 files, 2 ranks (shards 4 and 5), batch 2: both ranks take 2 steps, no file twice."""
    root = in_format(make_colour_folder(tmp_path / "train", 9), fmt)
    d = backend_cfg(kind, format=fmt)
    loaders = [build_rotation_loader(d, root, batch_size=2, train=True, seed=0,
                                     info=DistInfo(rank=r, world_size=2)) for r in range(2)]
    assert [len(lo) for lo in loaders] == [2, 2]
    for epoch in range(2):
        seen = []
        for lo in loaders:
            lo.set_epoch(epoch)
            batches = list(lo)
            assert len(batches) == 2
            seen.extend(i for x, _ in batches for i in identify(x, 9)[::4])
        assert len(seen) == len(set(seen)) == 8


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,batch", [(23, 4), (9, 2)])
def test_validation_class_loader_counts_each_image_once(tmp_path, kind, n, batch, fmt):
    """Odd image counts, 2 ranks: every image exactly once per epoch, none padded or dropped.

    (9, 2): shards of 4 and 5 -- DALI pads rank 0's shard to 5, i.e. a third, padding-only batch.
    """
    root = in_format(make_folder(tmp_path / "val", [1] * n), fmt)  # one image per class: label = image id
    d = backend_cfg(kind, format=fmt)
    seen = []
    for r in range(2):
        lo = build_class_loader(d, root, batch_size=batch, info=DistInfo(rank=r, world_size=2),
                                train=False, seed=0)
        assert lo.num_samples == n and len(lo.classes) == n
        shard = n // 2 if r == 0 else n - n // 2
        assert len(lo) == -(-shard // batch)
        for epoch in range(3):
            lo.set_epoch(epoch)
            labels = [int(v) for _, y in lo for v in y]
            assert len(labels) == shard
            seen.extend(labels)
    assert sorted(seen) == sorted(list(range(n)) * 3)
