"""Probe engine: frozen means frozen, one trunk forward per batch, exact val counting."""
from __future__ import annotations

from pathlib import Path

import torch

from models import MODELS
from probes.engine import ProbeSet, evaluate, topk_correct, train_one_epoch
from probes.heads import build_probe
from probes.protocol import ProbeProtocol
from rotnet.config import config_from_dict
from rotnet.distributed import DistInfo

SIZE, CLASSES = 32, 4
LAYERS = ["block1", "block2", "block3"]
CFG = config_from_dict({"data": {"crop_size": SIZE, "mean": [0.5] * 3, "std": [1.0] * 3},
                        "model": {"arch": "nin", "width": 0.125, "num_blocks": 3},
                        "train": {"channels_last": False}})


def _protocol(layers=LAYERS) -> ProbeProtocol:
    """What the engine reads: layers, the batch preparation (cfg, precision), the lr schedule, the ranks."""
    return ProbeProtocol(head="linear", layers=list(layers), batch_size=6, precision="fp32", seed=0,
                         labels_per_class=0, info=DistInfo(), cfg=CFG, epochs=2, schedule=[[0, 0.1]],
                         finetune=False, val_every=0, out=Path("unused"))


class ListLoader(list):
    """In-memory (images uint8 (B,H,W,C), labels (B,)) batches; stands in for a class loader."""

    def set_epoch(self, epoch):
        pass


def _loader(n_batches=3, batch=6, seed=0, last=None):
    """`last`: size of the final batch (a trimmed val batch), default `batch`."""
    g = torch.Generator().manual_seed(seed)
    out = ListLoader()
    for i in range(n_batches):
        b = last if last is not None and i == n_batches - 1 else batch
        x = torch.randint(0, 256, (b, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
        y = torch.randint(0, CLASSES, (b,), generator=g)
        out.append((x, y))
    return out


def _model(finetune=False, layers=LAYERS):
    torch.manual_seed(0)
    trunk = MODELS["nin"](CFG.model, SIZE)
    with torch.no_grad():
        feats = trunk.eval().features(torch.zeros(2, 3, SIZE, SIZE), list(layers))
    heads = {k: build_probe("linear", trunk, k, tuple(v.shape[1:]), CLASSES) for k, v in feats.items()}
    return ProbeSet(trunk, heads, finetune=finetune, precision="bf16")


def _trunk_state(model):
    return {k: v.clone() for k, v in model.trunk.state_dict().items()}  # params AND BN buffers


def _train(model, loader, epochs=2):
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    for epoch in range(epochs):
        train_one_epoch(model, loader, opt, _protocol(model.layers), epoch)
    return opt


def test_frozen_trunk_is_bit_identical_and_optimizer_sees_only_probes():
    model = _model()
    before = _trunk_state(model)
    opt = _train(model, _loader())
    after = model.trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "trunk params or BN stats changed"
    assert not model.trunk.training and all(not p.requires_grad for p in model.trunk.parameters())
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.heads.parameters()}
    model.train()                                    # asking for train mode keeps a frozen trunk in eval
    assert not model.trunk.training and model.heads.training


def test_finetune_changes_trunk():
    model = _model(finetune=True)
    before = _trunk_state(model)
    opt = _train(model, _loader(), epochs=1)
    after = model.trunk.state_dict()
    assert model.trunk.training
    assert any(not torch.equal(before[k], after[k]) for k in before if "running" not in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "running_mean" in k)
    assert {id(p) for g in opt.param_groups for p in g["params"]} >= {id(p) for p in model.trunk.parameters()}


def test_one_trunk_forward_per_batch_for_all_layers():
    model = _model()
    calls = []
    features = model.trunk.features

    def counting(x, layers):
        calls.append(list(layers))
        return features(x, layers)

    model.trunk.features = counting
    loader = _loader(n_batches=4)
    _train(model, loader, epochs=1)
    evaluate(model, loader, _protocol(model.layers))
    assert len(calls) == 2 * len(loader)
    assert all(c == ["block1", "block2", "block3"] for c in calls)


def test_topk_counts():
    logits = torch.tensor([[5.0, 1, 0], [0, 5, 1], [0, 1, 5], [9, 0, 0]])
    labels = torch.tensor([0, 2, 2, 1])
    c1, c5, n = topk_correct(logits, labels).tolist()
    assert (c1, c5, n) == (2, 4, 4)          # k=5 > 3 classes counts as k=3: every row hits


def test_val_denominator_is_number_of_images():
    model = _model()
    loader = _loader(n_batches=3, batch=5, last=2)     # 5 + 5 + a trimmed last batch of 2
    metrics = evaluate(model, loader, _protocol(model.layers))
    assert all(m["count"] == 12 for m in metrics.values())
    assert all(0 <= m["top1"] <= m["top5"] <= 100 for m in metrics.values())
