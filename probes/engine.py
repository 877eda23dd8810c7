"""Probe training and evaluation: one frozen trunk forward per batch feeds every probe.

    model = ProbeSet(trunk, {"conv4": head4, "conv5": head5}, finetune=False, precision="bf16")
    stats = train_one_epoch(model, loader, optimizer, protocol, epoch)   # lr from protocol.schedule
    metrics = evaluate(model, val_loader, protocol)   # {"conv4": {"top1": .., "top5": .., "count": ..}}
    result = fit_probes(protocol, trunk, "pretrained", checkpoint)   # the whole run, resumable
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines import batch_preparer, class_loaders
from probes.heads import build_probe
from probes.protocol import ProbeProtocol, Protocol
from probes.resume import load_state, restore_state, save_state
from rotnet.distributed import all_reduce_sum, autocast, barrier, place
from rotnet.progress import RunLogger, log
from rotnet.schedule import StepSchedule, build_optimizer


def freeze(trunk: nn.Module) -> None:
    """Frozen means frozen: no grads, eval mode (BN uses and keeps its running stats)."""
    trunk.eval()
    for p in trunk.parameters():
        p.requires_grad_(False)


@contextmanager
def eval_mode(trunk: nn.Module):
    """The trunk in eval mode inside the block, its mode restored after (the kNN monitor's trunk trains)."""
    was_training = trunk.training
    trunk.eval()
    try:
        yield trunk
    finally:
        trunk.train(was_training)


class ProbeSet(nn.Module):
    """Trunk + one head per layer. x (B, 3, H, W) -> {layer: logits (B, K)}.

    Frozen (default): the trunk runs under no_grad in eval mode, only the heads train.
    `finetune=True`: the trunk trains too. Autocast (bf16) unless precision == "fp32".
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

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters()) + (list(self.trunk.parameters()) if self.finetune else [])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        with autocast(self.precision, x.device):
            with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
                feats = self.trunk.features(x, self.layers)  # ONE forward for all layers
            # fp32 logits: the loss and top-k should not see bf16 rounding
            return {name: self.heads[name](feats[name]).float() for name in self.layers}


def topk_correct(logits: Tensor, labels: Tensor) -> Tensor:
    """logits (B, K), labels (B,) -> (correct@1, correct@5, B) float64 on the logits' device (no sync)."""
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])   # (B, min(5, K))
    counts = [hit[:, 0].sum(), hit.any(dim=1).sum()]
    return torch.stack(counts + [torch.full_like(counts[0], labels.numel())]).double()


def run_pass(model: nn.Module, loader: Iterable, p: Protocol, optimizer: torch.optim.Optimizer | None = None,
             lr_at: Callable[[int], float] | None = None, bar=None) -> Tensor:
    """One pass over `loader`, training when `optimizer` is given, else evaluating. Returns rank-summed
    (len(p.layers), 4) float64 on CPU: loss*n, correct@1, correct@5, n per layer.

    loss = sum of the per-layer losses: heads share no parameters, so each gets its own gradient.
    """
    training, layers, prepare = optimizer is not None, p.layers, batch_preparer(p.cfg, p.precision)
    model.train(training)
    sums = torch.zeros(len(layers), 4, dtype=torch.float64, device=p.info.device)
    for step, (images, labels) in enumerate(loader):
        with torch.set_grad_enabled(training):
            logits = model(prepare(images))
            losses = torch.stack([F.cross_entropy(logits[name], labels) for name in layers])
        if training:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
        with torch.no_grad():
            for i, name in enumerate(layers):
                loss_n = losses[i, None].double() * labels.numel()
                sums[i] += torch.cat([loss_n, topk_correct(logits[name], labels)])
        if bar is not None:
            bar.update(1)
            if training and step % 10 == 0:  # .item() waits for the GPU: only now and then
                bar.set_postfix(loss=f"{losses.sum().item():.3g}", lr=f"{lr_at(step):.2g}", refresh=False)
    return all_reduce_sum(sums, p.info).cpu()


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, p: ProbeProtocol,
                    epoch: int, bar=None) -> dict:
    """One epoch; lr set per step from p.schedule at the float epoch. Returns rank-summed stats."""
    t0, steps, lr_at = time.time(), max(1, len(loader)), StepSchedule(p.schedule)
    lr = lambda step: lr_at(epoch + step / steps)  # noqa: E731
    sums = run_pass(model, loader, p, optimizer, lr, bar)
    if not torch.isfinite(sums).all():
        raise FloatingPointError(f"probe loss became non-finite in epoch {epoch}; lower --lr")
    stats = {"lr": lr(steps - 1), "time_s": round(time.time() - t0, 2)}
    for name, (loss, c1, _, n) in zip(p.layers, sums.tolist()):
        stats[name] = {"train_loss": loss / max(1.0, n), "train_top1": 100.0 * c1 / max(1.0, n)}
    return stats


def evaluate(model: nn.Module, loader: Iterable, p: Protocol, bar=None) -> dict[str, dict]:
    """{layer: {"top1", "top5", "count"}} over the whole val split. Counts are summed over ranks and
    the val loader holds each image once over all ranks, so each counts once whatever the world size."""
    return percentages(run_pass(model, loader, p, bar=bar)[:, 1:], p.layers)


def percentages(sums: Tensor, layers: list[str]) -> dict[str, dict]:
    """Rank-summed counts (len(layers), 3) = correct@1, correct@5, n -> {layer: {"top1", "top5", "count"}}."""
    return {name: {"top1": 100.0 * c1 / max(1, n), "top5": 100.0 * c5 / max(1, n), "count": int(n)}
            for name, (c1, c5, n) in zip(layers, sums.tolist())}


def build_probe_set(p: ProbeProtocol, trunk: nn.Module, kind: str, num_classes: int) -> ProbeSet:
    """`trunk` plus a fresh probe per layer, on the device. Each probe is sized from one dry
    forward, (2, 3, S, S) -> {layer: (2, C, h, w)}, in eval mode so BN stats stay untouched."""
    size, dev = p.cfg.data.crop_size, p.info.device
    with torch.no_grad(), eval_mode(trunk.to(dev)):
        feats = trunk.features(torch.zeros(2, 3, size, size, device=dev), p.layers)
    torch.manual_seed(p.seed + 1)  # probe init: same on every rank, whichever trunk came first
    heads = {name: build_probe(p.head, trunk, name, tuple(f.shape[1:]), num_classes)
             for name, f in feats.items()}
    for name, head in heads.items():
        dims = getattr(head, "in_dim", None)  # the classifier's input size; conv heads have none
        log.info(f"[{kind}] {name}: features {tuple(feats[name].shape[1:])} -> {p.head} probe"
                 + (f" on {dims} dims" if dims else "")
                 + f" ({sum(x.numel() for x in head.parameters()) / 1e6:.2f}M params)")
    return ProbeSet(trunk, heads, finetune=p.finetune, precision=p.precision).to(dev)


def fit_probes(p: ProbeProtocol, trunk: nn.Module, kind: str, checkpoint: str) -> dict[str, dict]:
    """One probe per layer trained on `trunk` -> {layer: val metrics}; resumes from probe_state_<kind>.pt."""
    state_path, sig = p.out / f"probe_state_{kind}.pt", p.signature(kind, checkpoint)
    state = load_state(state_path, sig)
    if state is not None and state["result"] is not None:
        log.info(f"[{kind}] already complete in {state_path}; reusing its result")
        return state["result"]
    # built afresh for each trunk, so the pretrained and the random trunk see identical data
    train_loader, val_loader = class_loaders(p)
    raw = build_probe_set(p, trunk, kind, len(train_loader.classes))
    model = place(raw, p.info, p.cfg.train.channels_last)
    optimizer = build_optimizer(raw.trainable_parameters(), p.schedule[0][1], p.cfg.probe)
    start, history = (restore_state(state, raw, optimizer), state["history"]) if state else (0, [])
    if state:
        log.info(f"[{kind}] resuming from {state_path}: epoch {start + 1} of {p.epochs}")

    logger = RunLogger(p.out, p.info.is_main, jsonl_name="eval_log.jsonl", tensorboard=False)
    result = None
    for epoch in range(start, p.epochs):
        train_loader.set_epoch(epoch)
        logger.start_epoch(epoch + 1, len(train_loader))
        stats = {"model": kind, "epoch": epoch + 1,
                 **train_one_epoch(model, train_loader, optimizer, p, epoch, bar=logger.bar)}
        last = epoch + 1 == p.epochs
        if last or (p.val_every and (epoch + 1) % p.val_every == 0):
            stats["val"] = evaluate(model, val_loader, p)
        result = stats["val"] if last else None
        logger.end_epoch(stats)
        history.append(stats)
        val = {n: f" val@1 {stats['val'][n]['top1']:.2f}" if "val" in stats else "" for n in p.layers}
        log.info(f"[{kind}] epoch {epoch + 1}/{p.epochs} lr {stats['lr']:.3g} | "
                 + " | ".join(f"{n} loss {stats[n]['train_loss']:.3f}{val[n]}" for n in p.layers))
        if p.info.is_main:
            save_state(state_path, raw, optimizer,
                       {"signature": sig, "epoch": epoch + 1, "result": result, "history": history})
        barrier(p.info)
    logger.close()
    return result
