"""Weighted kNN (probes/knn.py): exact votes on a hand-made bank, chunking, a bank sharded over
ranks against one rank's result, the bank's memory from the layer shapes and the refusal of a bank
that cannot fit, pooling, and a frozen trunk that comes back exactly as it went in."""
from __future__ import annotations

import math
import threading

import pytest
import torch

import probes.knn
from models import MODELS, build_model
from probes.knn import (
    KNN_HEAD,
    KnnMonitor,
    bank_bytes,
    check_bank_fits,
    extract,
    knn_evaluate,
    knn_scores,
    pool_features,
)
from probes.protocol import KnnProtocol
from rotnet.cli import UsageError
from rotnet.config import ConfigError, config_from_dict
from rotnet.distributed import DistInfo

NIN = config_from_dict({"data": {"crop_size": 32, "mean": [0.5] * 3, "std": [1.0] * 3},
                        "model": {"arch": "nin", "width": 0.125, "num_blocks": 3},
                        "train": {"channels_last": False}})


def _p(k=20, t=0.07, info=DistInfo(), layers=("block1", "block3"), pool="avg") -> KnnProtocol:
    return KnnProtocol(head=KNN_HEAD, layers=list(layers), batch_size=4, precision="fp32", seed=0,
                       labels_per_class=0, info=info, cfg=NIN, k=k, t=t, pool=pool)


class Batches(list):
    """In-memory (images uint8 (B, H, W, 3), labels (B,)) batches with a class loader's num_samples
    and classes."""

    def __init__(self, images, labels, batch, classes):
        super().__init__((images[i: i + batch], labels[i: i + batch]) for i in range(0, len(labels), batch))
        self.num_samples, self.classes = len(labels), list(range(classes))


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_votes_on_a_toy_bank_are_hand_computable():
    # bank: two class-0 rows near the query, one class-1 row further, one class-1 row opposite.
    bank = _unit([1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0])
    labels = torch.tensor([0, 0, 1, 1])
    q = _unit([1.0, 0.0])
    t = 0.5
    scores = knn_scores(q, bank, labels, 3, _p(k=3, t=t))
    # 3 nearest: sims 1.0 (c0), 0.8 (c0), 0.0 (c1); the -1.0 row is out of the top 3
    expected = torch.tensor([[math.exp(1.0 / t) + math.exp(0.8 / t), math.exp(0.0 / t), 0.0]])
    assert torch.allclose(scores, expected, rtol=1e-6)
    # k=1: only the nearest row votes; k larger than the bank: every row votes
    assert torch.allclose(knn_scores(q, bank, labels, 3, _p(k=1, t=t)), torch.tensor([[math.exp(2.0), 0, 0]]))
    full = knn_scores(q, bank, labels, 3, _p(k=99, t=t))
    assert torch.allclose(full[0, 1], torch.tensor(1.0 + math.exp(-2.0)))


def test_temperature_decides_between_one_close_and_many_far_neighbours():
    bank = _unit([1.0, 0.0], [0.6, 0.8], [0.6, 0.8])     # one close class-0 row, two far class-1 rows
    labels = torch.tensor([0, 1, 1])
    q = _unit([1.0, 0.0])
    assert knn_scores(q, bank, labels, 2, _p(k=3, t=0.07)).argmax() == 0     # sharp: the close one wins
    assert knn_scores(q, bank, labels, 2, _p(k=3, t=100.0)).argmax() == 1    # flat: a plain majority vote


def _random_bank(n=50, q=13, dims=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n, dims, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(q, dims, generator=g), dim=1)
    return queries, bank, torch.randint(0, classes, (n,), generator=g)


def test_chunking_gives_the_unchunked_result():
    queries, bank, labels = _random_bank()
    whole = knn_scores(queries, bank, labels, 4, _p(k=5), chunk=1000)
    for chunk in (1, 4, 13):   # same votes; a (1, N) matmul may round differently from a (13, N) one
        part = knn_scores(queries, bank, labels, 4, _p(k=5), chunk=chunk)
        assert torch.allclose(part, whole, rtol=1e-5) and torch.equal(part.argmax(1), whole.argmax(1))


class ThreadWorld:
    """`world` ranks as threads: probes.knn.gathered stacks what every thread passed, in rank order."""

    def __init__(self, world: int):
        self.slots, self.barrier = [None] * world, threading.Barrier(world, timeout=30)

    def gathered(self, t, info):
        self.slots[info.rank] = t.clone()
        self.barrier.wait()
        out = torch.stack(self.slots)
        self.barrier.wait()   # nobody overwrites a slot before everyone has read them all
        return out


@pytest.mark.parametrize("k", [7, 60])   # 60 > every shard and > the bank: padded candidates never count
def test_bank_sharded_over_ranks_votes_as_one_rank(monkeypatch, k):
    """3 ranks with unequal bank shards (30, 17, 3 rows: fewer than k) and query shards (5, 5, 3),
    4 queries per round: each rank's scores are the single-rank scores of its queries."""
    queries, bank, labels = _random_bank()
    reference = knn_scores(queries, bank, labels, 4, _p(k=k), chunk=4)
    world = ThreadWorld(3)
    monkeypatch.setattr(probes.knn, "gathered", world.gathered)
    bank_rows, query_rows, results = ((0, 30), (30, 47), (47, 50)), ((0, 5), (5, 10), (10, 13)), {}

    def rank(r):
        (b0, b1), (q0, q1) = bank_rows[r], query_rows[r]
        results[r] = knn_scores(queries[q0:q1], bank[b0:b1], labels[b0:b1], 4,
                                _p(k=k, info=DistInfo(rank=r, world_size=3)), chunk=4)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    merged = torch.cat([results[r] for r in range(3)])
    assert torch.allclose(merged, reference, rtol=1e-5)
    assert torch.equal(merged.argmax(1), reference.argmax(1))          # identical top-1


def test_bad_k_or_t_is_refused():
    bank = _unit([1.0, 0.0])
    with pytest.raises(ValueError, match="k >= 1"):
        knn_scores(bank, bank, torch.tensor([0]), 1, _p(k=0))
    with pytest.raises(ValueError, match="T > 0"):
        knn_scores(bank, bank, torch.tensor([0]), 1, _p(t=0.0))


def _images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(n)


@pytest.mark.parametrize("pool", ["avg", "grid"])
def test_bank_bytes_is_what_extraction_holds(pool):
    """The estimate from the layer shapes is the bytes of the extracted rows (+ int64 labels), and a
    shard of the bank on each of 4 ranks is a quarter of it, rounded up to whole rows."""
    trunk = MODELS["nin"](NIN.model, 32)
    p = _p(layers=("block1", "block2", "block3"), pool=pool)
    images, labels = _images(10)
    feats, y = extract(p, trunk.eval(), Batches(images, labels, 4, 10), "bank")
    held = sum(f.numel() * f.element_size() for f in feats.values()) + y.numel() * 8
    assert bank_bytes(trunk, p.layers, pool, 10) == held
    assert bank_bytes(trunk, p.layers, pool, 10, world_size=4) == held // 10 * 3      # ceil(10 / 4) = 3 rows
    assert bank_bytes(trunk, p.layers, pool, 10, dtype=torch.float16) < held


def test_a_bank_that_cannot_fit_is_refused_before_extraction(monkeypatch):
    class Untouchable(list):
        num_samples, classes = 1_281_167, list(range(1000))

        def __iter__(self):
            raise AssertionError("extraction started")

    trunk = MODELS["nin"](NIN.model, 32)
    monkeypatch.setattr(probes.knn, "memory_for_bank", lambda device: 2**30)   # 1 GiB fits
    p = _p(layers=("block1", "block2", "block3"), pool="grid")
    with pytest.raises(UsageError, match=r"1,281,167 images .*grid pooling.* needs [\d.]+ GiB per rank of 1, "
                                         r"1.0 GiB fits on cpu"):
        knn_evaluate(p, trunk, Untouchable(), Untouchable())
    check_bank_fits(_p(layers=("block3",)), trunk, 1000)     # 1000 rows of 24 dims fit


@pytest.mark.parametrize("pool,dims", [("avg", 16), ("grid", 16 * 4 * 4)])
def test_pooling_shapes_and_norm(pool, dims):
    v = pool_features(torch.randn(3, 16, 4, 4), pool)   # grid: ~9k/16 cells, clamped to the 4x4 map
    assert v.shape == (3, dims) and torch.allclose(v.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="valid: avg, grid"):
        pool_features(torch.randn(1, 2, 2, 2), "max")


def test_frozen_trunk_is_untouched_and_batches_agree():
    """Eval mode and no grads during the run, mode restored, params and BN stats unchanged;
    the bank scored against itself puts each image first (top-1 100%)."""
    trunk = build_model(NIN, 0).trunk.train()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    seen = []
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    images, labels = _images(10)
    batches = Batches(images, labels, 6, 10)
    calls = []
    spy = trunk.features
    trunk.features = lambda x, layers: calls.append((x.shape[0], list(layers))) or spy(x, layers)
    out = knn_evaluate(_p(k=1), trunk, batches, batches)
    assert calls[0][0] == 1                                 # the bank's size from one image's shapes
    assert calls[1:] == [(6, ["block1", "block3"]), (4, ["block1", "block3"])] * 2   # one pass per batch
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
    from tests.test_eval import _images as image_folders

    image_folders(tmp_path)
    cfg = config_from_dict({"data": {"root": str(tmp_path), "crop_size": 32, "resize_size": 36},
                            "loader": {"backend": "torch", "num_threads": 0},
                            "model": {"arch": "nin", "width": 0.125, "num_blocks": 3},
                            "optim": {"epochs": 4, "batch_size_per_gpu": 4},
                            "train": {"precision": "fp32", "channels_last": False, "monitor_every": 2,
                                      "monitor_bank_per_class": 3, "monitor_query_per_class": 2}})
    trunk = build_model(cfg, 0).trunk
    monitor = KnnMonitor(cfg, DistInfo(), trunk)
    assert monitor.p.layers == ["block2"]                                # the middle of block1..block3
    assert [monitor.due(e) for e in range(4)] == [False, True, False, True]
    assert (monitor.bank.num_samples, monitor.queries.num_samples) == (9, 6)
    state = torch.get_rng_state()
    top1 = monitor(trunk)
    assert torch.equal(torch.get_rng_state(), state)
    assert list(top1) == ["block2"] and 0 <= top1["block2"] <= 100
    with pytest.raises(ConfigError, match="train.monitor_layers: unknown layer.*valid: block1"):
        KnnMonitor(config_from_dict({**{"train": {"monitor_layers": ["conv9"]}}}), DistInfo(), trunk)
