"""state_dict / load_state_dict: a resumed loader continues with exactly the same batches (image folders
and tar shards)."""
import io

import pytest
import torch

from pipelines import build_class_loader, build_rotation_loader
from rotnet.cli import InputError
from tests.pipelines.images import FORMATS, KINDS, cfg, in_format, make_folder, needs_dali

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("state") / "train", [4, 4, 3], size=(40, 52))


def roundtrip(state):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def take(loader, epoch, n):
    """The next n batches, crossing into the following epochs as a training loop would."""
    out = []
    while len(out) < n:
        loader.set_epoch(epoch)
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out, epoch
        epoch += 1
    return out, epoch


def build(kind, split, seed=5, fmt="folder"):
    name, over = kind  # prefetch 2: the DALI checkpoint must follow what was consumed, not prefetched
    d = cfg(prefetch=2, num_threads=2, format=fmt, **over)
    return build_rotation_loader(d, in_format(split, fmt), batch_size=2, rank=1, world_size=2, local_rank=0,
                                 device=CPU, train=True, seed=seed)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [1, 2, 3])  # mid-epoch, at the epoch's end, into the next epoch
def test_resume_continues_same_batches(split, kind, skip, fmt):
    a = build(kind, split, fmt=fmt)
    assert a.backend == ("dali" if kind[0] == "dali" else "torch")
    assert len(a) == 2  # 11 images, 2 ranks (5 each after the drop), 2 originals per step
    _, epoch = take(a, 0, skip)
    state = roundtrip(a.state_dict())
    expected, _ = take(a, epoch, 3)

    b = build(kind, split, fmt=fmt)
    b.load_state_dict(state)
    got, _ = take(b, epoch, 3)
    for (xa, ya), (xb, yb) in zip(expected, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("kind", KINDS)
def test_different_seed_different_order(split, kind):
    xa = take(build(kind, split, seed=1), 0, 1)[0][0][0]
    xb = take(build(kind, split, seed=2), 0, 1)[0][0][0]
    assert not torch.equal(xa, xb)


@needs_dali
def test_state_rejects_other_backend(split):
    dali = build(("dali", {"backend": "dali"}), split)
    torch_loader = build(("torch", {"backend": "torch"}), split)
    with pytest.raises(InputError, match="backend"):
        torch_loader.load_state_dict(dali.state_dict())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_labels_per_class_subset_deterministic_and_balanced(tmp_path, kind, fmt):
    root = in_format(make_folder(tmp_path / "train", [6, 5, 7], size=(34, 34)), fmt)
    name, over = kind
    d = cfg(format=fmt, **over)

    def labels(seed, rank):
        lo = build_class_loader(d, root, batch_size=2, rank=rank, world_size=2, local_rank=0, device=CPU,
                                train=False, seed=seed, labels_per_class=3)
        assert lo.num_samples == 9
        return [(int(v), x[i].float().mean().item()) for x, y in lo for i, v in enumerate(y)]

    a = labels(0, 0) + labels(0, 1)
    assert sorted(lab for lab, _ in a) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # balanced, all ranks together
    assert a == labels(0, 0) + labels(0, 1)                           # deterministic
    assert a != labels(1, 0) + labels(1, 1)                           # the seed picks the subset
