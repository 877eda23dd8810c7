"""Weighted k-nearest-neighbour evaluation of frozen trunk layers (DINO's protocol).

    bank = extract(trunk, bank_loader, layers, info, prepare, precision)     # {layer: (N, D)}, labels (N,)
    result = knn_evaluate(trunk, bank_loader, query_loader, layers, info, prepare, precision)
    # {layer: {"top1": .., "top5": .., "count": ..}}, the same record as probes.engine.evaluate

Protocol (Caron et al. 2021, DINO, `eval_knn.py`; also solo-learn, MMSelfSup): every feature is
pooled and L2-normalised; a query's k most cosine-similar bank features vote for their class
with weight exp(sim / T); the class with the largest summed vote is the prediction. No training:
one forward pass over the bank and one over the queries, every requested layer from the same
pass. Pooling `avg` (default, C dims: small enough for an ImageNet bank) or `grid` (the linear
probe's ~9k dims); the why and the memory of each: docs/eval.md.

Distributed: each rank extracts its shard of the bank (eval loaders hold each image once
over all ranks), the shards are all-gathered so every rank holds the whole bank, each rank
scores its shard of the queries, and the correct counts are all-reduced (as
`probes.engine.evaluate`). Memory: the similarity matrix is built `chunk` queries at a time,
(chunk, N); the bank is fp16 on GPU (exp runs in fp32: exp(1/0.07) overflows fp16), fp32 on CPU.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from probes.engine import class_loaders, eval_mode, freeze, percentages, topk_correct
from probes.heads import grid_pool, pool_grid
from probes.settings import Protocol
from rotnet.distributed import DistInfo, all_reduce_sum
from rotnet.progress import log
from rotnet.run import autocast, batch_preparer
from rotnet.schedule import due_after

KNN_HEAD = "knn"        # eval.py --head knn
KNN_K = 20              # DINO's defaults
KNN_T = 0.07
POOLS = ("avg", "grid")
QUERY_CHUNK = 256       # queries per similarity matrix: (256, N) fp16 is 650 MB for an ImageNet bank


# ---------------------------------------------------------------------------- features

def pool_features(feat: Tensor, pool: str) -> Tensor:
    """(B, C, h, w) -> (B, D) fp32, L2-normalised. avg: D = C; grid: D = C*gh*gw ~ 9k."""
    if pool not in POOLS:
        raise ValueError(f"kNN pooling {pool!r}; valid: {', '.join(POOLS)}")
    feat = feat.float()
    v = feat.mean(dim=(2, 3)) if pool == "avg" else grid_pool(feat, pool_grid(*feat.shape[1:])).flatten(1)
    return F.normalize(v, dim=1)


@torch.no_grad()
def layer_features(trunk: nn.Module, loader: Iterable, layers: list[str], prepare: Callable[[Tensor], Tensor],
                   precision: str, pool: str) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """Per batch of `loader`: ({layer: (B, D) pooled, normalised fp32}, labels (B,)), ONE trunk
    forward for all layers. The trunk runs in whatever mode it is in (callers use eval_mode)."""
    for images, labels in loader:
        x = prepare(images)                                                   # (B, 3, H, W)
        with autocast(precision, x.device):
            feats = trunk.features(x, layers)
        yield {name: pool_features(f, pool) for name, f in feats.items()}, labels


def extract(trunk: nn.Module, loader: Iterable, layers: list[str], info: DistInfo,
            prepare: Callable[[Tensor], Tensor], precision: str, pool: str = "avg") -> tuple[dict[str, Tensor], Tensor]:
    """Bank of this rank's shard of `loader`, gathered over ranks: ({layer: (N, D)}, labels (N,)).

    N is the whole split (all ranks' shards, rank order); rows on info.device.
    """
    # fp16 on GPU (half the memory, tensor-core matmul), fp32 on CPU (fp16 matmul is slow there)
    dtype = torch.float16 if info.device.type == "cuda" else torch.float32
    rows: dict[str, list[Tensor]] = {name: [] for name in layers}
    labels: list[Tensor] = []
    for feats, y in layer_features(trunk, loader, layers, prepare, precision, pool):
        for name in layers:
            rows[name].append(feats[name].to(dtype))
        labels.append(y)
    if not labels:
        raise ValueError("kNN bank: the loader yielded no images on this rank")
    bank = {name: gather_rows(torch.cat(r), info) for name, r in rows.items()}
    return bank, gather_rows(torch.cat(labels), info)


def gather_rows(t: Tensor, info: DistInfo) -> Tensor:
    """(n_r, ...) on each rank -> (sum n_r, ...) on every rank, in rank order. Shards may differ
    in size (eval loaders trim, never pad), so each is padded to the largest for all_gather."""
    if not info.distributed:
        return t
    n = [0] * info.world_size
    dist.all_gather_object(n, t.shape[0])
    padded = t.new_zeros((max(n), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in n]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, n)])


# ---------------------------------------------------------------------------- voting

def knn_scores(queries: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int = KNN_K,
               t: float = KNN_T, chunk: int = QUERY_CHUNK) -> Tensor:
    """Weighted votes: queries (Q, D), bank (N, D), both L2-normalised; bank_labels (N,) ->
    (Q, num_classes) fp32, score[q, c] = sum over the k nearest bank rows of class c of exp(sim / t).

    Built `chunk` queries at a time, so memory is (chunk, N), not (Q, N). k > N uses all N.
    """
    if k < 1 or t <= 0:
        raise ValueError(f"kNN needs k >= 1 and T > 0, got k={k}, T={t}")
    k = min(k, bank.shape[0])
    out = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=queries.device)
    for lo in range(0, queries.shape[0], chunk):
        sim = queries[lo: lo + chunk].to(bank.dtype) @ bank.T                 # (c, N) cosine similarity
        top, idx = sim.topk(k, dim=1)                                         # (c, k)
        weights = top.float().div_(t).exp_()                                  # fp32: exp(14.3) > fp16 max
        out[lo: lo + chunk].scatter_add_(1, bank_labels[idx], weights)
    return out


@torch.no_grad()
def knn_evaluate(trunk: nn.Module, bank_loader: Iterable, query_loader: Iterable, layers: list[str],
                 info: DistInfo, prepare: Callable[[Tensor], Tensor], precision: str, num_classes: int,
                 k: int = KNN_K, t: float = KNN_T, pool: str = "avg", chunk: int = QUERY_CHUNK) -> dict[str, dict]:
    """Top-1/top-5 (%) of the weighted kNN per layer: bank from `bank_loader`, every query of
    `query_loader` counted once over all ranks. Returns {layer: {"top1", "top5", "count"}}.

    The trunk is used as is, in eval mode and without grads; its mode is restored afterwards
    and nothing of it changes (safe to call in the middle of pretraining).
    """
    sums = torch.zeros(len(layers), 3, dtype=torch.float64, device=info.device)  # correct@1, correct@5, n
    with eval_mode(trunk):
        bank, bank_labels = extract(trunk, bank_loader, layers, info, prepare, precision, pool)
        for feats, y in layer_features(trunk, query_loader, layers, prepare, precision, pool):
            for i, name in enumerate(layers):
                sums[i] += topk_correct(knn_scores(feats[name], bank[name], bank_labels, num_classes, k, t, chunk), y)
    return percentages(all_reduce_sum(sums, info), layers)


# ---------------------------------------------------------------------------- eval.py --head knn

def knn_probe(p: Protocol, trunk: nn.Module, k: int = KNN_K, t: float = KNN_T, pool: str = "avg") -> dict[str, dict]:
    """eval.py's kNN run on one trunk: bank = the train split (eval recipe; the seeded
    p.labels_per_class subset if set), queries = the whole val split. {layer: metrics}."""
    bank_loader, query_loader = class_loaders(p.cfg, p.info, p.batch_size, p.seed, augment=False,
                                              train_per_class=p.labels_per_class)
    trunk = trunk.to(p.info.device)
    if p.cfg.train.channels_last:
        trunk.to(memory_format=torch.channels_last)
    freeze(trunk)
    prepare = batch_preparer(p.cfg, p.precision)
    log.info(f"kNN bank: {bank_loader.num_samples} images of {p.cfg.data.train_dir}, queries: "
             f"{query_loader.num_samples} of {p.cfg.data.val_dir}; k={k}, T={t}, {pool} pooling")
    return knn_evaluate(trunk, bank_loader, query_loader, p.layers, p.info, prepare, p.precision,
                        len(bank_loader.classes), k, t, pool)


# ---------------------------------------------------------------------------- train.monitor_every

class KnnMonitor:
    """kNN top-1 of a fixed labelled subset during pretraining (train.monitor_every epochs).

    Bank: train.monitor_bank_per_class images per class of data.train_dir, queries:
    train.monitor_query_per_class of data.val_dir (0: all), both seeded subsets picked once,
    eval recipe, sharded over ranks like eval.py's kNN. It leaves the training alone: no
    grads, BN in eval mode (mode restored), its own loaders, and the global RNG state forked
    (an iterated DataLoader draws its base seed from it; dropout would then see other masks).
    """

    def __init__(self, cfg, info: DistInfo, trunk: nn.Module):
        t = cfg.train
        self.cfg, self.info, self.every = cfg, info, t.monitor_every
        self.layers = list(t.monitor_layers) or [trunk.layer_names[(len(trunk.layer_names) - 1) // 2]]
        bad = [name for name in self.layers if name not in trunk.layer_names]
        if bad:
            raise ValueError(f"train.monitor_layers: unknown layer(s) {', '.join(bad)} for {trunk.arch}; "
                             f"valid: {', '.join(trunk.layer_names)}")
        with self._own_rng():
            self.bank, self.queries = class_loaders(cfg, info, cfg.optim.batch_size_per_gpu, t.seed,
                                                    augment=False, train_per_class=t.monitor_bank_per_class,
                                                    val_per_class=t.monitor_query_per_class)
        log.info(f"kNN monitor every {self.every} epochs on {', '.join(self.layers)}: bank "
                 f"{self.bank.num_samples} images of {cfg.data.train_dir}, {self.queries.num_samples} queries "
                 f"of {cfg.data.val_dir}")

    def _own_rng(self):
        cuda = [self.info.device] if self.info.device.type == "cuda" else []
        return torch.random.fork_rng(devices=cuda)

    def due(self, epoch: int) -> bool:
        """After epoch index `epoch` (0-based): every `every` epochs and after the last one."""
        return due_after(epoch, self.every, self.cfg.optim.epochs)

    def __call__(self, trunk: nn.Module) -> dict[str, float]:
        """{layer: kNN top-1 (%)} of `trunk` as it is now. Collective: every rank calls it."""
        with self._own_rng():
            res = knn_evaluate(trunk, self.bank, self.queries, self.layers, self.info,
                               batch_preparer(self.cfg, self.cfg.train.precision), self.cfg.train.precision,
                               len(self.bank.classes))
        return {name: round(m["top1"], 2) for name, m in res.items()}
