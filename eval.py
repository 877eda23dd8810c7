#!/usr/bin/env python
"""Frozen-layer evaluation of RotNet features (Gidaris, Singh, Komodakis, ICLR 2018).

A classifier ("probe") is trained with class labels on each FROZEN trunk layer and
scored on the val split (top-1/top-5). All requested layers share ONE frozen forward
pass per batch, so `--layer all` costs about as much as one layer.

    python eval.py                                  # latest checkpoint of configs/sample.yaml's run
    python eval.py --with-random                    # ... and a random-init trunk, side by side
    python eval.py --checkpoint runs/in/checkpoint.pt --layer conv4,conv5 --head mlp
    torchrun --nproc_per_node=8 eval.py --checkpoint runs/in data.root=/data/imagenet

Protocols (--head): linear (paper Table 5), mlp (Table 4 / CIFAR), conv (Table 3); see
docs/eval.md. Results go to --output-dir: eval.json, eval.md, eval.png, eval_log.jsonl.
A rerun with the same arguments resumes after the last finished epoch.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.rotnet import build_rotnet
from pipelines import build_class_loader, prepare_batch
from probes.engine import ProbeSet, evaluate, train_one_epoch
from probes.heads import HEADS, build_probe, probe_input_dims
from probes.report import write_reports
from probes.resume import ResumeMismatch, load_state, save_state
from probes.settings import UsageError, parse_layers, resolve_checkpoint, run_signature, stretch_schedule
from rotnet.checkpoint import git_commit, load_checkpoint
from rotnet.config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config
from rotnet.distributed import DistInfo, barrier, cleanup, init_distributed
from rotnet.progress import RunLogger, log, setup_logging
from pipelines.sample_data import ensure_sample_data
from rotnet.schedule import StepSchedule

DEFAULT_CONFIG = "configs/sample.yaml"


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML with the DATA and PROBE settings (the model always comes from the checkpoint). "
                        "Default: the config stored in the checkpoint, i.e. the data it was trained on; "
                        f"{DEFAULT_CONFIG} to locate the default checkpoint and for --checkpoint random.")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file or run folder (its checkpoint.pt). 'random': a random-init trunk "
                        "of the config's model, the baseline. Default: the latest checkpoint in the "
                        "config's train.output_dir.")
    p.add_argument("--layer", default="all",
                   help="one layer (conv4), a comma list (conv2,conv4) or 'all' (default). alexnet: "
                        "conv1..conv5; resnet: conv1, layer1..layer4; nin: block1..blockN. One forward "
                        "pass feeds every probe, so 'all' costs little more than one layer.")
    p.add_argument("--head", choices=HEADS, default=None,
                   help="linear: ~9k-dim max-pooled linear probe (paper Table 5; the standard, compare "
                        "with it). mlp: non-linear head (alexnet: Table 4 conv4/conv5 heads; others: FC "
                        "x2). conv: one more NIN block + linear (Table 3, CIFAR). Default probe.head.")
    p.add_argument("--epochs", type=int, default=None,
                   help="probe epochs (default probe.epochs). The schedule's milestones stretch with it: "
                        "7 instead of 35 epochs moves a drop at epoch 5 to epoch 1.")
    p.add_argument("--lr", type=float, default=None,
                   help="initial lr; the schedule keeps its ratios (default: its first lr). Lower it if "
                        "the train loss starts far above ln(classes); scale it with a much larger batch.")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per process per step (default probe.batch_size_per_gpu).")
    p.add_argument("--labels-per-class", type=int, default=0, metavar="K",
                   help="train the probes on a seeded random subset of K images per class (few-label "
                        "setting); 0 = all. Val is always complete.")
    p.add_argument("--finetune", action="store_true",
                   help="train the trunk too (trunk.train(), its params in the optimizer). Not a "
                        "frozen-feature evaluation: an upper bound, reported separately.")
    p.add_argument("--with-random", action="store_true",
                   help="also run a random-init trunk of the same architecture through the same protocol "
                        "and print both side by side: the difference is what pretraining bought.")
    p.add_argument("--output-dir", default=None,
                   help="results and resume state. Default <checkpoint folder>/eval_<head> (random: "
                        "<train.output_dir>/eval_<head>_random), plus _finetune / _k<K> suffixes.")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="autocast dtype of trunk and probes, CPU and GPU (default bf16); fp32 to debug.")
    p.add_argument("--val-every", type=int, default=0, metavar="N",
                   help="also score val every N epochs, for the log only: the reported number is the last "
                        "epoch's (no model selection on val). 0 = only at the end.")
    p.add_argument("--seed", type=int, default=None,
                   help="probe init, data order, label subset and random trunk (default train.seed).")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted config overrides parsed as YAML, e.g. data.root=/data/imagenet "
                        "probe.batch_size_per_gpu=256. Unknown keys and wrong types are errors.")
    return p.parse_args(argv)


@dataclass
class Protocol:
    """What defines one probe run; shared by the pretrained and the random trunk."""
    info: DistInfo
    cfg: Config
    head: str
    layers: list[str]
    epochs: int
    schedule: list[list[float]]
    batch_size: int
    precision: str
    finetune: bool
    seed: int
    labels_per_class: int
    val_every: int
    out: Path


def build_trunk_from(model_src: Config, state: dict | None, seed: int) -> nn.Module:
    """Trunk of the run `model_src` describes (model, rotations, crop size).

    state: the checkpoint's 'model' dict (trunk.* / head.*, loaded strictly), or None for
    a random init seeded by `seed`: the same weights on every rank and every rerun.
    """
    torch.manual_seed(seed)
    rotnet = build_rotnet(model_src.model, num_rotations=len(model_src.data.rotations),
                          input_size=model_src.data.crop_size)
    if state is not None:
        rotnet.load_state_dict(state, strict=True)
    return rotnet.trunk


def build_loaders(p: Protocol):
    """(train, val) class loaders. Built afresh for each trunk so both see identical data."""
    root, d = Path(p.cfg.data.root), p.cfg.data
    common = dict(batch_size=p.batch_size, rank=p.info.rank, world_size=p.info.world_size,
                  local_rank=p.info.local_rank, device=p.info.device, seed=p.seed)
    try:
        train = build_class_loader(d, str(root / d.train_dir), train=True, labels_per_class=p.labels_per_class,
                                   **common)
        val = build_class_loader(d, str(root / d.val_dir), train=False, **common)
    except (ValueError, FileNotFoundError) as e:  # empty/missing split, fewer images than one batch, ...
        raise UsageError(f"cannot load the data under {root}: {e}") from e
    if list(train.classes) != list(val.classes):
        raise UsageError(f"class folders of {root / d.train_dir} and {root / d.val_dir} differ "
                         f"({len(train.classes)} vs {len(val.classes)} classes)")
    return train, val


def feature_shapes(trunk: nn.Module, layers: list[str], size: int, device) -> dict[str, tuple[int, int, int]]:
    """(C, h, w) per layer for a size x size input: one dry forward in eval mode (BN untouched)."""
    was_training = trunk.training
    with torch.no_grad():
        feats = trunk.eval().features(torch.zeros(2, 3, size, size, device=device), layers)
    trunk.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in feats.items()}


def signature(p: Protocol, kind: str, checkpoint: str) -> dict:
    """What the resume state of `kind` must match (see probes.settings.run_signature)."""
    return run_signature(kind=kind, checkpoint=checkpoint, head=p.head, layers=p.layers, epochs=p.epochs,
                         schedule=p.schedule, batch_size=p.batch_size, world_size=p.info.world_size,
                         precision=p.precision, finetune=p.finetune, seed=p.seed,
                         labels_per_class=p.labels_per_class, cfg_dict=config_to_dict(p.cfg))


# ---------------------------------------------------------------------------- one probe run

def fit_probes(p: Protocol, trunk: nn.Module, kind: str, checkpoint: str) -> dict[str, dict]:
    """Train one probe per layer on `trunk` (frozen unless finetune); return {layer: val metrics}.

    Resumes from <out>/probe_state_<kind>.pt, which is rewritten after every epoch.
    """
    info, cfg = p.info, p.cfg
    state_path, sig = p.out / f"probe_state_{kind}.pt", signature(p, kind, checkpoint)
    state = load_state(state_path, sig)
    if state is not None and state["result"] is not None:
        log.info(f"[{kind}] already complete in {state_path}; reusing its result")
        return state["result"]
    train_loader, val_loader = build_loaders(p)

    trunk = trunk.to(info.device)
    shapes = feature_shapes(trunk, p.layers, cfg.data.crop_size, info.device)
    torch.manual_seed(p.seed + 1)  # probe init: same on every rank, whichever trunk came first
    heads = {name: build_probe(p.head, trunk, name, shapes[name], len(train_loader.classes)) for name in p.layers}
    raw = ProbeSet(trunk, heads, finetune=p.finetune, precision=p.precision).to(info.device)
    if cfg.train.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    for name in p.layers:
        dims = probe_input_dims(heads[name])
        log.info(f"[{kind}] {name}: features {shapes[name]} -> {p.head} probe" + (f" on {dims} dims" if dims else "")
                 + f" ({sum(x.numel() for x in heads[name].parameters()) / 1e6:.2f}M params)")
    model = raw
    if info.distributed:  # DDP syncs only params that require grad: the probes (and a fine-tuned trunk)
        model = DistributedDataParallel(raw, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    sgd = dict(lr=p.schedule[0][1], momentum=cfg.probe.momentum, nesterov=cfg.probe.nesterov,
               weight_decay=cfg.probe.weight_decay)
    params = raw.trainable_parameters()  # the probes only, unless --finetune
    try:   # fused SGD: one kernel for the whole update
        optimizer = torch.optim.SGD(params, fused=True, **sgd)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.SGD(params, foreach=True, **sgd)

    start, history = 0, []
    if state is not None:
        raw.heads.load_state_dict(state["probes"])
        if p.finetune:
            raw.trunk.load_state_dict(state["trunk"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["epoch"], state["history"]
        log.info(f"[{kind}] resuming from {state_path}: epoch {start + 1} of {p.epochs}")

    lr_at = StepSchedule(p.schedule, name="probe schedule")
    logger = RunLogger(p.out, info.is_main, jsonl_name="eval_log.jsonl", tensorboard=False)
    prepare = lambda images: prepare_batch(images, cfg.data, cfg.train.channels_last)  # noqa: E731
    result = None
    for epoch in range(start, p.epochs):
        train_loader.set_epoch(epoch)
        logger.start_epoch(epoch + 1, len(train_loader))
        stats = {"model": kind, "epoch": epoch + 1}
        stats.update(train_one_epoch(model, train_loader, optimizer, lr_at, epoch, len(train_loader), p.layers,
                                     info, prepare, bar=logger.bar))
        last = epoch + 1 == p.epochs
        if last or (p.val_every and (epoch + 1) % p.val_every == 0):
            stats["val"] = evaluate(model, val_loader, p.layers, info, prepare)
            result = stats["val"] if last else None
        logger.end_epoch(stats)
        history.append(stats)
        log.info(f"[{kind}] epoch {epoch + 1}/{p.epochs} lr {stats['lr']:.3g} | " + " | ".join(
            f"{n} loss {stats[n]['train_loss']:.3f}" + (f" val@1 {stats['val'][n]['top1']:.2f}" if "val" in stats
                                                        else "") for n in p.layers))
        if info.is_main:
            save_state(state_path, signature=sig, epoch=epoch + 1, probes=raw.heads.state_dict(),
                       optimizer=optimizer.state_dict(), trunk=raw.trunk.state_dict() if p.finetune else None,
                       result=result, history=history)
        barrier(info)
    logger.close()
    return result


# ---------------------------------------------------------------------------- main

def main(argv=None) -> None:
    args = get_args(argv)
    info = init_distributed()
    setup_logging(info.is_main, None)
    try:
        run(args, info)
    except (UsageError, ConfigError, ResumeMismatch) as e:
        sys.exit(f"error: {e}")
    finally:
        cleanup(info)


def run(args: argparse.Namespace, info: DistInfo) -> None:
    # ------------------------------------------------------------ checkpoint and config
    config_name = args.config or DEFAULT_CONFIG
    cfg = load_config(config_name, args.overrides)
    ckpt_path = resolve_checkpoint(args.checkpoint, cfg.train.output_dir, config_name)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    # The model always comes from the checkpoint; data/probe settings from --config, else from
    # the config stored in the checkpoint (the data it was trained on), overrides on top.
    model_src = config_from_dict(ckpt["config"], str(ckpt_path)) if ckpt else cfg
    if ckpt and args.config is None:
        cfg = config_from_dict(apply_overrides(ckpt["config"], args.overrides), f"{ckpt_path} config + overrides")
    cfg.model = model_src.model
    head = args.head or cfg.probe.head
    if head not in HEADS:
        raise UsageError(f"probe.head={head!r}; valid heads: {', '.join(HEADS)}")
    seed = cfg.train.seed if args.seed is None else args.seed
    epochs = cfg.probe.epochs if args.epochs is None else args.epochs
    schedule = stretch_schedule(cfg.probe.schedule, cfg.probe.epochs, epochs, args.lr)

    # ------------------------------------------------------------ trunks and layers
    trunks = {}
    if ckpt is not None:
        trunks["pretrained"] = build_trunk_from(model_src, ckpt["model"], seed)
    if ckpt is None or args.with_random:
        trunks["random"] = build_trunk_from(model_src, None, seed)
    layers = parse_layers(args.layer, next(iter(trunks.values())), head)

    suffix = ("_finetune" if args.finetune else "") + (f"_k{args.labels_per_class}" if args.labels_per_class else "")
    if args.output_dir:
        out = Path(args.output_dir)
    elif ckpt_path is not None:
        out = ckpt_path.parent / f"eval_{head}{suffix}"
    else:
        out = Path(cfg.train.output_dir) / f"eval_{head}_random{suffix}"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)

    # ------------------------------------------------------------ data
    if not cfg.data.root:
        cfg.data.root = str(ensure_sample_data(seed=cfg.data.sample_seed))
    p = Protocol(info=info, cfg=cfg, head=head, layers=layers, epochs=epochs, schedule=schedule,
                 batch_size=args.batch_size or cfg.probe.batch_size_per_gpu, precision=args.precision,
                 finetune=args.finetune, seed=seed, labels_per_class=args.labels_per_class,
                 val_every=args.val_every, out=out)
    log.info(f"commit {git_commit()} | world size {info.world_size} | device {info.device} | precision "
             f"{p.precision} | {model_src.model.arch} width {model_src.model.width}")
    log.info(f"checkpoint: {ckpt_path or 'none (random init)'}"
             + (f" (epoch {ckpt.get('epoch')}, commit {ckpt.get('commit')})" if ckpt else ""))
    log.info(f"{head} probes on {', '.join(layers)} | data {cfg.data.root} | batch {p.batch_size}/process x "
             f"{info.world_size} | {epochs} epochs, (epoch, lr) schedule {schedule}"
             + (f", milestones stretched from probe.epochs={cfg.probe.epochs}" if epochs != cfg.probe.epochs else "")
             + f" | output {out}")

    # ------------------------------------------------------------ train and evaluate the probes
    sources = {kind: str(ckpt_path) if kind == "pretrained" else f"random:{seed}" for kind in trunks}
    for kind in trunks:  # refuse a mismatching resume state now, not after hours of the first run
        load_state(out / f"probe_state_{kind}.pt", signature(p, kind, sources[kind]))
    results = {kind: fit_probes(p, trunk, kind, sources[kind]) for kind, trunk in trunks.items()}

    # ------------------------------------------------------------ report
    if info.is_main:
        meta = {"arch": model_src.model.arch, "width": model_src.model.width, "head": head, "epochs": epochs,
                "layers": layers, "checkpoint": str(ckpt_path) if ckpt_path else None,
                "checkpoint_epoch": ckpt.get("epoch") if ckpt else None,
                "checkpoint_commit": ckpt.get("commit") if ckpt else None, "commit": git_commit(),
                "labels_per_class": args.labels_per_class, "finetune": args.finetune, "seed": seed,
                "schedule": schedule, "batch_size": p.batch_size, "world_size": info.world_size,
                "precision": p.precision, "data_root": cfg.data.root, "model_selection": "none (last epoch)"}
        table = write_reports(results, meta, out)
        print("\n" + table, flush=True)
        log.info(f"wrote {out}/eval.json, eval.md, eval.png, eval_log.jsonl")


if __name__ == "__main__":
    main()
