"""Probe training and evaluation: one frozen trunk forward per batch feeds every probe.

    model = ProbeSet(trunk, {"conv4": head4, "conv5": head5}, finetune=False, precision="bf16")
    stats = train_one_epoch(model, loader, optimizer, lr_at, epoch, ...)
    metrics = evaluate(model, val_loader, ...)   # {"conv4": {"top1": .., "top5": .., "count": ..}}

Why one pass: the trunk forward is the expensive part, so evaluating five layers
costs little more than one (benchmarks/eval_onepass.py measures it).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rotnet.distributed import DistInfo, all_reduce_sum


def freeze(trunk: nn.Module) -> None:
    """Frozen means frozen: no grads, eval mode (BN uses and keeps its running stats)."""
    trunk.eval()
    for p in trunk.parameters():
        p.requires_grad_(False)


class ProbeSet(nn.Module):
    """Trunk + one head per layer. x (B, 3, H, W) -> {layer: logits (B, K)}.

    Frozen (default): the trunk forward runs under no_grad in eval mode and its
    outputs are detached, so only the heads train. `finetune=True`: the trunk
    trains too (train mode, grads flow from every head's loss into it).
    Trunk and heads run under autocast (bf16) unless precision == "fp32".
    """

    def __init__(self, trunk: nn.Module, heads: dict[str, nn.Module], finetune: bool = False,
                 precision: str = "bf16"):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)
        self.layers = list(heads)
        self.finetune = finetune
        self.precision = precision
        if not finetune:
            freeze(trunk)

    def train(self, mode: bool = True) -> "ProbeSet":
        """Heads follow `mode`; a frozen trunk stays in eval mode whatever is asked."""
        super().train(mode)
        if not self.finetune:
            self.trunk.eval()
        return self

    def probe_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer sees: head params, plus trunk params only when fine-tuning."""
        return self.probe_parameters() + (list(self.trunk.parameters()) if self.finetune else [])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=self.precision != "fp32"):
            with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
                feats = self.trunk.features(x, self.layers)  # ONE forward for all layers
            # fp32 logits: the loss and top-k should not see bf16 rounding
            return {name: self.heads[name](feats[name]).float() for name in self.layers}


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Correct counts for each k, then the number of real samples: (len(ks) + 1,) float64.

    logits (B, K), labels (B,); label -1 (padding) is ignored. k larger than K counts
    as K. Stays on the logits' device (no host sync per batch).
    """
    keep = labels >= 0
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices                  # (B, kmax)
    hit = pred.eq(labels[:, None]) & keep[:, None]           # (B, kmax); padding never hits
    counts = [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks] + [keep.sum()]
    return torch.stack(counts).to(torch.float64)


def _to_device(images: Tensor, labels: Tensor, device: torch.device, prepare: Callable[[Tensor], Tensor]):
    return prepare(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True).long()


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    lr_at: Callable[[float], float], epoch: int, steps_per_epoch: int, layers: list[str],
                    info: DistInfo, prepare: Callable[[Tensor], Tensor], bar=None) -> dict:
    """One epoch over `loader`; lr set per step from the float epoch. Returns rank-summed stats.

    loss = sum of the per-layer cross-entropies: heads share no parameters, so each
    head gets exactly its own gradient, and one optimizer step updates them all.
    """
    model.train()
    sums = torch.zeros(len(layers), 3, dtype=torch.float64, device=info.device)  # loss*n, correct@1, n
    t0, lr = time.time(), float("nan")
    for step, (images, labels) in enumerate(loader):
        lr = lr_at(epoch + step / max(1, steps_per_epoch))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = _to_device(images, labels, info.device, prepare)
        logits = model(x)
        losses = [F.cross_entropy(logits[name], y, ignore_index=-1) for name in layers]
        loss = torch.stack(losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for i, name in enumerate(layers):
                c1, n = topk_correct(logits[name], y, ks=(1,))
                sums[i] += torch.stack([losses[i].detach().double() * n, c1, n])
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:  # .item() waits for the GPU: only now and then
                bar.set_postfix(loss=f"{loss.item():.3g}", lr=f"{lr:.2g}", refresh=False)
    sums = all_reduce_sum(sums, info).cpu()
    if not torch.isfinite(sums).all():
        raise FloatingPointError(f"probe loss became non-finite in epoch {epoch}; lower --lr")
    stats = {"lr": lr, "time_s": round(time.time() - t0, 2)}
    for i, name in enumerate(layers):
        n = max(1.0, sums[i, 2].item())
        stats[name] = {"train_loss": sums[i, 0].item() / n, "train_top1": 100.0 * sums[i, 1].item() / n}
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, layers: list[str], info: DistInfo,
             prepare: Callable[[Tensor], Tensor], bar=None) -> dict[str, dict]:
    """Top-1/top-5 (%) per layer over the whole val split.

    Counts, not per-rank means, are summed across ranks and padding (label -1) is
    skipped, so every val image counts exactly once whatever the world size.
    Returns {layer: {"top1", "top5", "count"}}.
    """
    model.eval()
    sums = torch.zeros(len(layers), 3, dtype=torch.float64, device=info.device)  # correct@1, correct@5, n
    for images, labels in loader:
        x, y = _to_device(images, labels, info.device, prepare)
        logits = model(x)
        for i, name in enumerate(layers):
            sums[i] += topk_correct(logits[name], y)
        if bar is not None:
            bar.update(1)
    sums = all_reduce_sum(sums, info).cpu()
    out = {}
    for i, name in enumerate(layers):
        n = int(sums[i, 2].item())
        out[name] = {"top1": 100.0 * sums[i, 0].item() / max(1, n),
                     "top5": 100.0 * sums[i, 1].item() / max(1, n), "count": n}
    return out
