"""Pixel-exact rotations and label order, every backend/variant and rotation set."""
import pytest
import torch

from pipelines import build_class_loader, build_rotation_loader
from pipelines.rotations import rotate_hwc
from tests.pipelines.images import cfg, needs_dali

CPU = torch.device("cpu")
# (name, config overrides): dali_rotate_in_graph exercises the GPU graph's rotations on CPU.
VARIANTS = [pytest.param(("dali", dict(backend="dali")), id="dali", marks=needs_dali),
            pytest.param(("dali-graph", dict(backend="dali")), id="dali-graph", marks=needs_dali),
            pytest.param(("torch", dict(backend="torch")), id="torch"),
            pytest.param(("resident", dict(backend="torch", resident=True)), id="resident")]
SETS = [[0, 90, 180, 270], [0, 180], [90, 270], [0, 45, 90, 135, 180, 225, 270, 315]]


def data_for(variant, **kw):
    name, over = variant
    return cfg(**over, **kw, dali_rotate_in_graph=name == "dali-graph")


def first_batch(loader):
    return next(iter(loader))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rotations", SETS, ids=["4", "0-180", "90-270", "8"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_rotations_are_rot90_of_own_crop(square_split, variant, rotations, train):
    if train and len(rotations) == 8 and variant[0] != "dali":
        pytest.skip("8-set covered once per recipe is enough")
    d = data_for(variant, rotations=rotations)
    loader = build_rotation_loader(d, square_split, batch_size=3, rank=0, world_size=1, local_rank=0,
                                   device=CPU, train=train, seed=1)
    x, y = first_batch(loader)
    k, n = len(rotations), 3
    assert x.shape == (k * n, 32, 32, 3) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == list(range(k)) * n  # sample-major, label r
    base = rotations[0]
    for i in range(n):
        ref = x[k * i]  # rotation rotations[0] of original i
        for r, a in enumerate(rotations):
            if (a - base) % 90 == 0:
                expect = torch.rot90(ref, (a - base) // 90, dims=(0, 1))
                assert torch.equal(x[k * i + r], expect), (variant[0], a)
            else:  # odd multiple of 45: interpolated from the unrotated crop; implementations differ slightly
                approx = rotate_hwc(ref, a).float()
                inner = slice(8, 24)  # away from the zero-filled corners
                diff = (x[k * i + r].float() - approx)[inner, inner].abs().mean()
                assert diff < 12, (variant[0], a, float(diff))


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_random_matches_class_crop(square_split, variant):
    """one_random: K*N originals per step; each output = its own crop rotated by rotations[label]."""
    rotations = [0, 90, 180, 270]
    d = data_for(variant, rotations=rotations, rotation_mode="one_random")
    rot = build_rotation_loader(d, square_split, batch_size=2, rank=0, world_size=1, local_rank=0,
                                device=CPU, train=False, seed=3)
    cls = build_class_loader(data_for(variant), square_split, batch_size=8, rank=0, world_size=1,
                             local_rank=0, device=CPU, train=False, seed=3)
    x, y = first_batch(rot)
    plain, _ = first_batch(cls)
    assert x.shape == (8, 32, 32, 3) and y.shape == (8,)
    assert 0 <= int(y.min()) and int(y.max()) < 4
    for i in range(8):
        assert torch.equal(x[i], torch.rot90(plain[i], int(y[i]), dims=(0, 1)))
    assert len(rot) == 2  # validation: 15 images = 8 + 7 originals (last step partial)


def test_rotate_hwc_direction():
    """rotate_hwc(., 90) is torch.rot90 k=1 (counter-clockwise): top-right pixel goes top-left."""
    img = torch.zeros(4, 4, 3, dtype=torch.uint8)
    img[0, 3] = 255
    assert rotate_hwc(img, 90)[0, 0, 0] == 255
    assert torch.equal(rotate_hwc(img, 270), torch.rot90(img, 3, (0, 1)))
