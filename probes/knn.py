"""Weighted k-NN evaluation of frozen trunk layers (DINO's protocol), the bank sharded over ranks.

    result = knn_probe(p, trunk, "pretrained", source)   # eval.py --head knn; p: a KnnProtocol
    result = knn_evaluate(p, trunk, bank_loader, query_loader)   # {layer: {"top1", "top5", "count"}}
    need = bank_bytes(trunk, ["layer4"], "avg", 1_281_167, world_size=64, dtype=torch.float16)

Protocol, pooling and memory: docs/eval.md. Each rank keeps only the bank rows it extracted
(N / world, not DINO's all-gathered bank). Queries go in rounds: all ranks' next queries are
gathered, each rank finds their k nearest rows in its shard, the candidates are gathered, and each
rank merges its own queries' world x k candidates into the global top k. A bank that cannot fit
is refused before any extraction.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines import batch_preparer, class_loaders
from probes.engine import eval_mode, freeze, percentages, topk_correct
from probes.heads import grid_pool, pool_grid
from probes.protocol import KnnProtocol
from rotnet.cli import UsageError
from rotnet.config import ConfigError
from rotnet.distributed import DistInfo, all_reduce_sum, autocast
from rotnet.progress import log
from rotnet.schedule import due_after

KNN_HEAD = "knn"        # eval.py --head knn
KNN_K = 20              # DINO's defaults
KNN_T = 0.07
POOLS = ("avg", "grid")
QUERY_CHUNK = 256       # queries per round over all ranks: a (256, N / world) similarity matrix per rank
GPU_BANK_SHARE = 0.8    # of the GPU memory free before extraction; activations need the rest
HOST_BANK_SHARE = 0.5   # of the host's physical memory, split over the ranks torchrun starts on it


def pool_features(feat: Tensor, pool: str) -> Tensor:
    """(B, C, h, w) -> (B, D) fp32, L2-normalised. avg: D = C; grid: D = C*gh*gw ~ 9k."""
    if pool not in POOLS:
        raise ValueError(f"kNN pooling {pool!r}; valid: {', '.join(POOLS)}")
    feat = feat.float()
    v = feat.mean(dim=(2, 3)) if pool == "avg" else grid_pool(feat, pool_grid(*feat.shape[1:])).flatten(1)
    return F.normalize(v, dim=1)


def bank_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPU (exp runs in fp32: exp(1/0.07) overflows fp16), fp32 on CPU (slow fp16 matmul)."""
    return torch.float16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def bank_bytes(trunk: nn.Module, layers: list[str], pool: str, n_images: int, world_size: int = 1,
               dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the kNN bank per rank: ceil(n_images / world_size) rows of pooled `layers` in `dtype`
    plus an int64 label; sizes from one forward of a zero image at trunk.input_size."""
    device = next(trunk.parameters()).device
    with eval_mode(trunk):
        feats = trunk.features(torch.zeros(1, 3, trunk.input_size, trunk.input_size, device=device), layers)
    dims = sum(pool_features(f, pool).shape[1] for f in feats.values())
    return -(-n_images // world_size) * (dims * dtype.itemsize + torch.int64.itemsize)


def memory_for_bank(device: torch.device) -> int:
    """Bytes a bank may take on `device`: GPU_BANK_SHARE of the GPU memory free now; on CPU,
    HOST_BANK_SHARE of physical memory over the ranks on this host (torchrun's LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * GPU_BANK_SHARE)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(host * HOST_BANK_SHARE) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_bank_fits(p: KnnProtocol, trunk: nn.Module, n_images: int) -> None:
    """UsageError, before anything is extracted, when the bank of `n_images` cannot fit on a rank."""
    need = bank_bytes(trunk, p.layers, p.pool, n_images, p.info.world_size, bank_dtype(p.info.device))
    room = memory_for_bank(p.info.device)
    if need > room:
        raise UsageError(f"kNN bank of {n_images:,} images ({', '.join(p.layers)}, {p.pool} pooling) needs "
                         f"{need / 2**30:.1f} GiB per rank of {p.info.world_size}, {room / 2**30:.1f} GiB "
                         f"fits on {p.info.device.type}: use avg pooling, fewer layers or more ranks")


@torch.no_grad()
def extract(p: KnnProtocol, trunk: nn.Module, loader: Iterable, what: str) -> tuple[dict, Tensor]:
    """This rank's rows: ({layer: (n_r, D) pooled, normalised, bank_dtype}, labels (n_r,)), one forward
    per batch for all layers."""
    prepare, dtype = batch_preparer(p.cfg, p.precision), bank_dtype(p.info.device)
    rows: dict[str, list[Tensor]] = {name: [] for name in p.layers}
    labels: list[Tensor] = []
    for images, y in loader:
        x = prepare(images)                                                   # (B, 3, H, W)
        with autocast(p.precision, x.device):
            feats = trunk.features(x, p.layers)
        for name, f in feats.items():
            rows[name].append(pool_features(f, p.pool).to(dtype))
        labels.append(y)
    if not labels:   # a split with fewer images than ranks
        raise UsageError(f"kNN {what}: rank {p.info.rank} of {p.info.world_size} got no images; "
                         "use fewer ranks")
    # one layer at a time, freed as joined: the peak stays near the bank, not twice it
    return {name: torch.cat(rows.pop(name)) for name in p.layers}, torch.cat(labels)


def gathered(t: Tensor, info: DistInfo) -> Tensor:
    """t (same shape on every rank) -> (world_size, *t.shape) on every rank, in rank order."""
    if not info.distributed:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def knn_scores(queries: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, p: KnnProtocol,
               chunk: int = QUERY_CHUNK) -> Tensor:
    """This rank's queries (q_r, D) vs the sharded bank: bank (n_r, D), bank_labels (n_r,) this rank's
    rows -> (q_r, num_classes) fp32, score[q, c] = sum of exp(sim / p.t) over q's p.k nearest rows
    (all ranks) of class c. Collective: every rank calls it with its own queries."""
    if p.k < 1 or p.t <= 0:
        raise ValueError(f"kNN needs k >= 1 and T > 0, got k={p.k}, T={p.t}")
    info, k = p.info, p.k
    step = max(1, chunk // info.world_size)                                    # queries per rank per round
    most = int(gathered(torch.tensor([queries.shape[0]], device=queries.device), info).max())   # same rounds
    out = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=queries.device)
    mine = slice(info.rank * step, (info.rank + 1) * step)
    for lo in range(0, most, step):
        n = queries[lo: lo + step].shape[0]
        batch = queries.new_zeros(step, queries.shape[1])
        batch[:n] = queries[lo: lo + step]
        sim = gathered(batch, info).flatten(0, 1).to(bank.dtype) @ bank.T       # (world*step, n_r) cosine
        top, idx = sim.topk(min(k, bank.shape[0]), dim=1)
        # k columns on every rank: a short shard pads with -inf, which never wins and weighs exp(-inf) = 0
        sims = top.new_full((sim.shape[0], k), float("-inf"))
        labels = bank_labels.new_zeros(sim.shape[0], k)
        sims[:, : top.shape[1]], labels[:, : top.shape[1]] = top, bank_labels[idx]
        sims = gathered(sims, info)[:, mine].transpose(0, 1).flatten(1)          # (step, world*k): my queries
        labels = gathered(labels, info)[:, mine].transpose(0, 1).flatten(1)
        best, pos = sims.topk(k, dim=1)                                          # the global k nearest
        weights = best.float().div_(p.t).exp_()                                  # fp32: exp(14.3) > fp16 max
        out[lo: lo + n].scatter_add_(1, labels.gather(1, pos)[:n], weights[:n])
    return out


@torch.no_grad()
def knn_evaluate(p: KnnProtocol, trunk: nn.Module, bank_loader, query_loader) -> dict[str, dict]:
    """{layer: {"top1", "top5", "count"}} of the weighted kNN; the trunk is left unchanged (its mode
    restored), so it is safe to call in the middle of pretraining."""
    check_bank_fits(p, trunk, bank_loader.num_samples)
    with eval_mode(trunk):
        bank, bank_labels = extract(p, trunk, bank_loader, "bank")
        queries, labels = extract(p, trunk, query_loader, "queries")
    sums = torch.zeros(len(p.layers), 3, dtype=torch.float64, device=p.info.device)  # correct@1, correct@5, n
    for i, name in enumerate(p.layers):
        scores = knn_scores(queries[name], bank[name], bank_labels, len(bank_loader.classes), p)
        sums[i] = topk_correct(scores, labels)
    return percentages(all_reduce_sum(sums, p.info), p.layers)


def knn_probe(p: KnnProtocol, trunk: nn.Module, kind: str, source: str) -> dict[str, dict]:
    """eval.py --head knn on one trunk: bank = the train split (its labels_per_class subset if set),
    queries = the whole val split."""
    bank_loader, query_loader = class_loaders(p, augment=False)
    trunk = trunk.to(p.info.device)
    if p.cfg.train.channels_last:
        trunk.to(memory_format=torch.channels_last)
    freeze(trunk)
    log.info(f"[{kind}] kNN of {source}: bank {bank_loader.num_samples} images of {p.cfg.data.train_dir}, "
             f"queries {query_loader.num_samples} of {p.cfg.data.val_dir}; {p.summary()}")
    return knn_evaluate(p, trunk, bank_loader, query_loader)


class KnnMonitor:
    """kNN top-1 of fixed seeded subsets during pretraining (train.monitor_*; docs/eval.md). It leaves
    training alone: no grads, mode restored, own loaders, and the global RNG forked (an iterated
    DataLoader draws its base seed from it)."""

    def __init__(self, cfg, info: DistInfo, trunk: nn.Module):
        t = cfg.train
        self.every, self.epochs = t.monitor_every, cfg.optim.epochs
        layers = list(t.monitor_layers) or [trunk.layer_names[(len(trunk.layer_names) - 1) // 2]]
        bad = [name for name in layers if name not in trunk.layer_names]
        if bad:
            raise ConfigError(f"train.monitor_layers: unknown layer(s) {', '.join(bad)} for {trunk.arch}; "
                              f"valid: {', '.join(trunk.layer_names)}")
        # train.precision is resolved by now (train.resolve)
        self.p = KnnProtocol(head=KNN_HEAD, layers=layers, batch_size=cfg.optim.batch_size_per_gpu,
                             precision=t.precision, seed=t.seed, labels_per_class=t.monitor_bank_per_class,
                             info=info, cfg=cfg, k=KNN_K, t=KNN_T, pool="avg")
        with self._own_rng():
            self.bank, self.queries = class_loaders(self.p, augment=False,
                                                    val_per_class=t.monitor_query_per_class)
        log.info(f"kNN monitor every {self.every} epochs on {', '.join(layers)}: bank "
                 f"{self.bank.num_samples} images of {cfg.data.train_dir}, {self.queries.num_samples} "
                 f"queries of {cfg.data.val_dir}")

    def _own_rng(self):
        cuda = [self.p.info.device] if self.p.info.device.type == "cuda" else []
        return torch.random.fork_rng(devices=cuda)

    def due(self, epoch: int) -> bool:
        """After epoch index `epoch` (0-based): every `every` epochs and after the last one."""
        return due_after(epoch, self.every, self.epochs)

    def __call__(self, trunk: nn.Module) -> dict[str, float]:
        """{layer: kNN top-1 (%)} of `trunk` as it is now. Collective: every rank calls it."""
        with self._own_rng():
            res = knn_evaluate(self.p, trunk, self.bank, self.queries)
        return {name: round(m["top1"], 2) for name, m in res.items()}
