"""Weighted kNN (probes/knn.py): exact votes on a hand-made bank, chunking, pooling, and a
frozen trunk that comes back exactly as it went in."""
from __future__ import annotations

import math

import pytest
import torch

from models.rotnet import build_rotnet
from probes.knn import knn_evaluate, knn_scores, pool_features
from rotnet.config import config_from_dict
from rotnet.distributed import DistInfo


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_votes_on_a_toy_bank_are_hand_computable():
    # bank: two class-0 rows near the query, one class-1 row further, one class-1 row opposite.
    bank = _unit([1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0])
    labels = torch.tensor([0, 0, 1, 1])
    q = _unit([1.0, 0.0])
    t = 0.5
    scores = knn_scores(q, bank, labels, num_classes=3, k=3, t=t)
    # 3 nearest: sims 1.0 (c0), 0.8 (c0), 0.0 (c1); the -1.0 row is out of the top 3
    expected = torch.tensor([[math.exp(1.0 / t) + math.exp(0.8 / t), math.exp(0.0 / t), 0.0]])
    assert torch.allclose(scores, expected, rtol=1e-6)
    # k=1: only the nearest row votes; k larger than the bank: every row votes
    assert torch.allclose(knn_scores(q, bank, labels, 3, k=1, t=t), torch.tensor([[math.exp(2.0), 0, 0]]))
    full = knn_scores(q, bank, labels, 3, k=99, t=t)
    assert torch.allclose(full[0, 1], torch.tensor(1.0 + math.exp(-2.0)))


def test_temperature_decides_between_one_close_and_many_far_neighbours():
    bank = _unit([1.0, 0.0], [0.6, 0.8], [0.6, 0.8])     # one close class-0 row, two far class-1 rows
    labels = torch.tensor([0, 1, 1])
    q = _unit([1.0, 0.0])
    assert knn_scores(q, bank, labels, 2, k=3, t=0.07).argmax() == 0     # sharp: the close one wins
    assert knn_scores(q, bank, labels, 2, k=3, t=100.0).argmax() == 1    # flat: a plain majority vote


def test_chunking_gives_the_unchunked_result():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    q = torch.nn.functional.normalize(torch.randn(13, 8, generator=g), dim=1)
    whole = knn_scores(q, bank, labels, 4, k=5, chunk=1000)
    for chunk in (1, 4, 13):   # same votes; a (1, N) matmul may round differently from a (13, N) one
        part = knn_scores(q, bank, labels, 4, k=5, chunk=chunk)
        assert torch.allclose(part, whole, rtol=1e-5) and torch.equal(part.argmax(1), whole.argmax(1))


def test_bad_k_or_t_is_refused():
    bank = _unit([1.0, 0.0])
    with pytest.raises(ValueError, match="k >= 1"):
        knn_scores(bank, bank, torch.tensor([0]), 1, k=0)
    with pytest.raises(ValueError, match="T > 0"):
        knn_scores(bank, bank, torch.tensor([0]), 1, t=0.0)


@pytest.mark.parametrize("pool,dims", [("avg", 16), ("grid", 16 * 4 * 4)])
def test_pooling_shapes_and_norm(pool, dims):
    v = pool_features(torch.randn(3, 16, 4, 4), pool)   # grid: ~9k/16 cells, clamped to the 4x4 map
    assert v.shape == (3, dims) and torch.allclose(v.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="valid: avg, grid"):
        pool_features(torch.randn(1, 2, 2, 2), "max")


def test_frozen_trunk_is_untouched_and_batches_agree():
    """Eval mode and no grads during the run, mode restored, params and BN stats unchanged;
    the bank scored against itself puts each image first (top-1 100%)."""
    cfg = config_from_dict({"model": {"arch": "nin", "width": 0.125, "num_blocks": 3}})
    trunk = build_rotnet(cfg.model, num_rotations=4, input_size=32).trunk.train()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    seen = []
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(10, 3, 32, 32, generator=g), torch.arange(10)
    batches = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    calls = []
    spy = trunk.features
    trunk.features = lambda x, layers: calls.append(list(layers)) or spy(x, layers)
    out = knn_evaluate(trunk, batches, batches, ["block1", "block3"], DistInfo(), lambda x: x, "fp32",
                       num_classes=10, k=1)
    assert all(calls_ == ["block1", "block3"] for calls_ in calls) and len(calls) == 4  # one pass per batch
    assert out["block1"] == {"top1": 100.0, "top5": 100.0, "count": 10} and out["block3"]["count"] == 10
    assert trunk.training                                   # mode restored for the training loop
    assert all(p.requires_grad for p in trunk.parameters())
    after = trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # incl. BN running stats
    del trunk.features
    assert seen and all(not training and not grad for training, grad in seen)


def test_monitor_leaves_the_global_rng_alone(tmp_path):
    """An iterated DataLoader draws its base seed from the global RNG: the monitor forks it, so
    the training's random stream (dropout, its own loader seeds) is the same with and without it."""
    from probes.knn import KnnMonitor
    from tests.test_eval import _images

    _images(tmp_path)
    cfg = config_from_dict({"data": {"root": str(tmp_path), "crop_size": 32, "resize_size": 36, "backend": "torch",
                                     "num_threads": 0},
                            "model": {"arch": "nin", "width": 0.125, "num_blocks": 3},
                            "optim": {"epochs": 4, "batch_size_per_gpu": 4},
                            "train": {"precision": "fp32", "channels_last": False, "monitor_every": 2,
                                      "monitor_bank_per_class": 3, "monitor_query_per_class": 2}})
    trunk = build_rotnet(cfg.model, num_rotations=4, input_size=32).trunk
    monitor = KnnMonitor(cfg, DistInfo(), trunk)
    assert monitor.layers == ["block2"]                                  # the middle of block1..block3
    assert [monitor.due(e) for e in range(4)] == [False, True, False, True]
    assert (monitor.bank.num_samples, monitor.queries.num_samples) == (9, 6)
    state = torch.get_rng_state()
    top1 = monitor(trunk)
    assert torch.equal(torch.get_rng_state(), state)
    assert list(top1) == ["block2"] and 0 <= top1["block2"] <= 100
    with pytest.raises(ValueError, match="train.monitor_layers: unknown layer.*valid: block1"):
        KnnMonitor(config_from_dict({**{"train": {"monitor_layers": ["conv9"]}}}), DistInfo(), trunk)
