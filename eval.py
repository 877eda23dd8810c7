#!/usr/bin/env python
"""Frozen-layer evaluation of RotNet features (Gidaris, Singh, Komodakis, ICLR 2018).

A classifier ("probe") is trained on each FROZEN trunk layer and scored on val (top-1/top-5);
all requested layers share ONE frozen forward pass per batch.

    python eval.py                                  # latest checkpoint of configs/sample.yaml's run
    python eval.py --with-random                    # ... and a random-init trunk, side by side
    python eval.py --checkpoint runs/in/checkpoint.pt --layer conv4,conv5 --head mlp
    torchrun --nproc_per_node=8 eval.py --checkpoint runs/in data.root=/data/imagenet

Protocols (--head linear, mlp, conv, knn) and outputs: docs/eval.md. A rerun with the same
arguments resumes after the last finished epoch.
"""
from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from pathlib import Path

from models import build_model
from pipelines import class_labels_missing, with_data_root
from probes.config_layering import DEFAULT_CONFIG, resolve_config
from probes.engine import fit_probes
from probes.heads import HEADS, parse_layers
from probes.knn import KNN_HEAD, KNN_K, KNN_T, POOLS, knn_probe
from probes.protocol import KnnProtocol, ProbeProtocol, Protocol
from probes.report import write_reports
from probes.resume import load_state
from rotnet.checkpoint import git_commit, settings_line
from rotnet.cli import ArgumentParser, InputError, UsageError, fail, number
from rotnet.config import Config
from rotnet.distributed import DistInfo, cleanup, init_distributed, on_rank0, resolve_precision
from rotnet.progress import TRACKER_NAMES, EvalTable, log, log_eval, require, setup_logging
from rotnet.runlock import own_folder
from rotnet.schedule import stretch_schedule


def get_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--config", default=None,
                   help="YAML with the data and probe settings (the model is the checkpoint's). Default: the "
                        f"checkpoint's own config; {DEFAULT_CONFIG} to find it and for 'random'.")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file or run folder. 'random': a random-init trunk, the baseline. "
                        "Default: the latest checkpoint in the config's train.output_dir.")
    p.add_argument("--layer", default="all",
                   help="conv4, a comma list (conv2,conv4) or 'all' (default; costs little more than one "
                        "layer). alexnet: conv1..conv5; resnet: conv1, layer1..layer4; nin: block1..blockN.")
    p.add_argument("--head", choices=(*HEADS, KNN_HEAD), default=None,
                   help="linear: ~9k-dim linear probe (Table 5, the standard to compare with). mlp: "
                        "alexnet's Table 4 head (others: FC x2). conv: NIN block + linear (Table 3). "
                        "knn: weighted k-NN, no training, a quick ranking of layers and checkpoints. "
                        "Default probe.head.")
    p.add_argument("--epochs", type=number(int, 1), default=None,
                   help="probe epochs (default probe.epochs); the schedule's milestones stretch with it.")
    p.add_argument("--lr", type=number(float, 0, strict=True), default=None,
                   help="initial lr, schedule ratios kept (default: its first lr). Lower it if the train "
                        "loss starts far above ln(classes); scale it with a much larger batch.")
    p.add_argument("--batch-size", type=number(int, 1), default=None,
                   help="images per process per step (default probe.batch_size_per_gpu).")
    p.add_argument("--labels-per-class", type=number(int, 0), default=0, metavar="K",
                   help="train on a seeded subset of K images per class; 0 = all. Val is always complete.")
    p.add_argument("--finetune", action="store_true",
                   help="train the trunk too: not a frozen-feature evaluation but an upper bound.")
    p.add_argument("--with-random", action="store_true",
                   help="also run a random-init trunk through the same protocol, side by side: the "
                        "difference is what pretraining bought.")
    p.add_argument("--output-dir", default=None,
                   help="results and resume state. Default <checkpoint folder>/eval_<head> (random: "
                        "<train.output_dir>/eval_<head>_random), plus _finetune / _k<K> suffixes.")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast dtype. auto (default): bf16 where the device has it natively, else fp32; "
                        "fp32 to debug.")
    p.add_argument("--val-every", type=number(int, 0), default=0, metavar="N",
                   help="also score val every N epochs, for the log only (the last epoch's is reported). "
                        "0 = only at the end.")
    p.add_argument("--seed", type=int, default=None,
                   help="probe init, data order, label subset and random trunk (default train.seed).")
    p.add_argument("--knn-k", type=number(int, 1), default=KNN_K,
                   help=f"--head knn: neighbours that vote (default {KNN_K}); with --labels-per-class K keep "
                        "it <= K.")
    p.add_argument("--knn-t", type=number(float, 0, strict=True), default=KNN_T,
                   help=f"--head knn: vote weight exp(cosine / T) (default {KNN_T}); larger T weighs the "
                        "neighbours more equally.")
    p.add_argument("--knn-pool", choices=POOLS, default="avg",
                   help="avg (default): C dims per layer, fits ImageNet banks. grid: the linear probe's ~9k "
                        "dims (~23 GB fp16 per ImageNet layer); use it to rank conv layers as the probes do.")
    p.add_argument("--log-to", choices=TRACKER_NAMES, default=None,
                   help="also add the results (a table and eval.png) to the training run's W&B or MLflow "
                        "run, the one its checkpoint names (train.loggers; docs/training.md).")
    p.add_overrides("data.root=/data/imagenet probe.batch_size_per_gpu=256")
    return p.parse_intermixed_args(argv)


def protocol(args: argparse.Namespace, cfg: Config, head: str, layers: list[str], seed: int, info: DistInfo,
             out: Path, sources: dict[str, str]) -> Protocol:
    """--head knn: KnnProtocol; else ProbeProtocol, whose mismatching resume state of any trunk is
    refused now, not after the first trunk's hours."""
    batch_size = args.batch_size or cfg.probe.batch_size_per_gpu
    precision = resolve_precision(args.precision, info.device)
    if head == KNN_HEAD:
        if args.finetune:
            raise UsageError("--head knn scores frozen features and trains nothing; drop --finetune")
        return KnnProtocol(head, layers, batch_size, precision, seed, args.labels_per_class, info, cfg,
                           k=args.knn_k, t=args.knn_t, pool=args.knn_pool)
    epochs = cfg.probe.epochs if args.epochs is None else args.epochs
    p = ProbeProtocol(head, layers, batch_size, precision, seed, args.labels_per_class, info, cfg,
                      epochs=epochs, schedule=stretch_schedule(cfg.probe.schedule, cfg.probe.epochs, epochs,
                                                               args.lr),
                      finetune=args.finetune, val_every=args.val_every, out=out)
    for kind, source in sources.items():
        load_state(out / f"probe_state_{kind}.pt", p.signature(kind, source))
    return p


def output_dir(args: argparse.Namespace, head: str, cfg: Config, ckpt_path: Path | None) -> Path:
    """--output-dir, else eval_<head>[_finetune][_k<K>] beside the checkpoint (random: train.output_dir)."""
    if args.output_dir:
        return Path(args.output_dir)
    suffix = (("_finetune" if args.finetune else "")
              + (f"_k{args.labels_per_class}" if args.labels_per_class else ""))
    if ckpt_path:
        return ckpt_path.parent / f"eval_{head}{suffix}"
    return Path(cfg.train.output_dir) / f"eval_{head}_random{suffix}"


def main(argv=None) -> None:
    args = get_args(argv)
    info = init_distributed()
    setup_logging(info.is_main, None)
    try:
        with ExitStack() as held:   # the output folder's lock, released however the run ends
            run(args, info, held)
    except InputError as e:   # bad config, checkpoint, data or flags: one line, exit 2
        fail(e)
    finally:
        cleanup(info)


def run(args: argparse.Namespace, info: DistInfo, held: ExitStack) -> None:
    """Evaluate every trunk asked for; rank 0 holds the output folder's lock in `held` (rotnet.runlock),
    so a second eval.py on the folder is refused instead of appending to its log and states."""
    require([args.log_to], "--log-to")
    cfg, trained, ckpt_path, ckpt = resolve_config(args.config, args.checkpoint, args.overrides)
    tracker_ids = ckpt.get("trackers", {}) if ckpt is not None else {}
    if args.log_to and args.log_to not in tracker_ids:
        raise UsageError(f"--log-to {args.log_to}: checkpoint {ckpt_path or '(random init)'} names no "
                         f"{args.log_to} run; train with train.loggers=[tensorboard,{args.log_to}]")
    head = args.head or cfg.probe.head   # the config's value is checked when it is loaded
    seed = cfg.train.seed if args.seed is None else args.seed
    trunks = {}
    if ckpt is not None:
        trunks["pretrained"] = build_model(trained, seed, ckpt["model"], str(ckpt_path)).trunk
    if ckpt is None or args.with_random:
        trunks["random"] = build_model(trained, seed).trunk
    sources = {kind: str(ckpt_path) if kind == "pretrained" else f"random:{seed}" for kind in trunks}
    out = output_dir(args, head, cfg, ckpt_path)
    layers = parse_layers(args.layer, next(iter(trunks.values())), head)
    # data.root "" becomes the sample data here, before the resume signature reads it
    cfg = with_data_root(cfg, require=(cfg.data.train_dir, cfg.data.val_dir))
    val_dir = str(Path(cfg.data.root) / cfg.data.val_dir)
    if unlabelled := class_labels_missing(cfg.data, val_dir):   # ImageNet's flat val/
        raise UsageError(unlabelled)
    p = protocol(args, cfg, head, layers, seed, info, out, sources)
    evaluate = knn_probe if head == KNN_HEAD else fit_probes
    def claim_folder():   # train.lock=false: file systems without locks, as for train.py
        held.enter_context(own_folder(out, "--output-dir", cfg.train.lock))
    on_rank0(claim_folder, info)   # a collective: a busy or bad folder stops every rank
    log.info(f"commit {git_commit()} | world size {info.world_size} | device {info.device} | precision "
             f"{p.precision} | {cfg.model.arch} width {cfg.model.width}")
    log.info(f"checkpoint: {ckpt_path or 'none (random init)'}"
             + (f" (epoch {ckpt.get('epoch')}, commit {ckpt.get('commit')})" if ckpt else ""))
    if ckpt is not None:
        log.info(settings_line(ckpt_path, ckpt["config"], f"data.*, probe.* from --config {args.config}" if
                               args.config else "data.*, probe.*, train.* from it too (no --config)")
                 + ", overrides on top")
    log.info(f"{head} probes on {', '.join(p.layers)} | data {cfg.data.root} | batch {p.batch_size}/process "
             f"x {info.world_size} | {p.summary()} | output {out}")

    meta = {"arch": cfg.model.arch, "width": cfg.model.width, **p.meta(), "world_size": info.world_size,
            "checkpoint": str(ckpt_path) if ckpt_path else None,
            "checkpoint_epoch": ckpt.get("epoch") if ckpt else None,
            "checkpoint_commit": ckpt.get("commit") if ckpt else None, "commit": git_commit(),
            "data_root": cfg.data.root, "wall_time_s": {}}
    results = {}
    for kind, trunk in trunks.items():
        t0 = time.perf_counter()   # a resumed probe run times only what it ran now
        results[kind] = evaluate(p, trunk, kind, sources[kind])
        meta["wall_time_s"][kind] = round(time.perf_counter() - t0, 1)
        log.info(f"[{kind}] {head} evaluation took {meta['wall_time_s'][kind]:.1f} s: "
                 + ", ".join(f"{layer} {r['top1']:.2f}" for layer, r in results[kind].items()))
        # reports after every trunk: a run killed during the random one keeps the pretrained numbers
        if info.is_main:
            table = write_reports(results, meta, out)
    if info.is_main:
        print("\n" + table, flush=True)
        log.info(f"wrote {out}/eval.json, eval.md, eval.png, eval_log.jsonl")
    if info.is_main and args.log_to:
        rows = [[kind, layer, r["top1"], r["top5"], r["count"]]
                for kind, layers in results.items() for layer, r in layers.items()]
        log_eval(args.log_to, ckpt_path.parent, tracker_ids[args.log_to],
                 EvalTable(out.name, ["trunk", "layer", "top1", "top5", "num_val"], rows, out / "eval.png",
                           ckpt.get("step", 0)))
        log.info(f"added the table and eval.png to {args.log_to} run {tracker_ids[args.log_to]}")


if __name__ == "__main__":
    main()
