#!/usr/bin/env python
"""Figures of a RotNet run (PNG, matplotlib Agg): attention maps, first-layer filters,
training curves, per-layer probe accuracy (pretrained vs random init).

    python visualize.py --run runs/cifar10_nin --out docs/figures/cifar10_nin
    python visualize.py --run runs/x --checkpoint runs/x/checkpoint.pt \
        --eval-json runs/x/eval/eval.json --out docs/figures/x --data-root ../shared/datasets/cifar10-jpeg

Writes, for --out PREFIX:
    PREFIX_attention.png  per conv block, as in the paper's Fig. 3: for every spatial cell the
                          sum over channels of |activation|^p (p = --power, 2 by default),
                          normalised per map, upsampled and laid over the image.
    PREFIX_filters.png    the first conv layer's filters as an RGB grid (each filter min-max scaled)
    PREFIX_curves.png     loss, train rotation accuracy and held-out rotation accuracy per epoch
                          from RUN/log.jsonl, and the kNN monitor's top-1 when the run logged it
                          (train.monitor_every)
    PREFIX_layers.png     top-1 per layer from each --eval-json (pretrained vs random init bars)
Figures whose inputs are missing (no log, no checkpoint, no eval.json) are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import zip_longest
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from models.export import trunk_from_checkpoint
from pipelines import list_images, prepare_batch
from pipelines.listing import list_shards
from probes.report import draw_top1_bars
from rotnet.atomic import make_folder
from rotnet.checkpoint import find_checkpoint
from rotnet.cli import ArgumentParser, InputError, UsageError, fail, number
from rotnet.config import Config, load_config

DPI = 100   # small PNGs: docs/figures keeps every file well under 200 KB


# ---------------------------------------------------------------------------- loading

def load_run(run_dir: Path | None, checkpoint: str | None,
             config: str | None) -> tuple[Config, nn.Module, str]:
    """(config, trunk in eval mode, description). checkpoint 'random' or no checkpoint: random init.

    The config comes from, in order: the checkpoint, --config, RUN/config.yaml.
    """
    if checkpoint is None and run_dir is not None and find_checkpoint(run_dir):
        checkpoint = str(find_checkpoint(run_dir))
    if checkpoint and checkpoint != "random":
        trunk, cfg, ckpt = trunk_from_checkpoint(checkpoint)
        return cfg, trunk, f"{checkpoint} (epoch {ckpt.get('epoch')})"
    if not (config or (run_dir is not None and (run_dir / "config.yaml").is_file())):
        raise UsageError("no checkpoint and no config: pass --checkpoint, --config or a --run with "
                         "config.yaml")
    cfg = load_config(config or run_dir / "config.yaml")
    return cfg, build_model(cfg, cfg.train.seed).trunk.eval(), f"random init (seed {cfg.train.seed})"


def pick_images(root: Path, n: int, fmt: str) -> list[tuple[str, bytes | None]]:
    """n (name, bytes or None) of `root` (an image folder, flat or by class, or tar shards: data.format),
    spread over classes: first image of each class in listing order, then second images, ..."""
    if fmt == "shards":
        names, labels, _, shards = list_shards(str(root))
    else:   # a flat split (ImageNet's val as extracted) is fine: labels only spread the picks
        names, labels = list_images(str(root), labelled=False)[:2]
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    picked = [i for row in zip_longest(*by_class.values()) for i in row if i is not None][:n]
    return [(names[i], shards.read(i) if fmt == "shards" else None) for i in picked]


def load_images(items: list[tuple[str, bytes | None]], cfg: Config) -> torch.Tensor:
    """The loaders' eval recipe (pipelines.recipe) -> uint8 (B, S, S, 3), the loaders' output format."""
    from pipelines.recipe import crop_batch, decode_rgb  # torchvision: only when images are drawn

    hwc = [decode_rgb(name, data).permute(1, 2, 0) for name, data in items]
    return crop_batch(hwc, cfg.data, train=False)


# ---------------------------------------------------------------------------- figures

def attention_maps(trunk: nn.Module, x: torch.Tensor, power: float) -> dict[str, torch.Tensor]:
    """x (B, 3, S, S) -> {layer: (B, S, S) in [0, 1]}: sum_c |a_c|^p per cell, min-max per map, upsampled."""
    with torch.no_grad():
        feats = trunk.features(x, trunk.layer_names)
    out = {}
    for name, a in feats.items():
        att = a.float().abs().pow(power).sum(1, keepdim=True)                       # (B, 1, h, w)
        att = F.interpolate(att, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        out[name] = unit_range(att)
    return out


def unit_range(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> each t[b] min-max scaled to [0, 1]."""
    lo, hi = t.flatten(1).aminmax(dim=1)
    shape = (-1,) + (1,) * (t.dim() - 1)
    return (t - lo.view(shape)) / (hi - lo).clamp_min(1e-12).view(shape)


def subplots(*args, **kwargs):
    """plt.subplots, pyplot imported on the first figure: matplotlib at the top would cost every
    `--help` and one-line error its import time."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on clusters or CI
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # imported by `subplots` already

    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_attention(images: torch.Tensor, maps: dict[str, torch.Tensor], power: float, title: str,
                   path: Path) -> Path:
    n, cols = images.shape[0], 1 + len(maps)
    fig, axes = subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    for i in range(n):
        img = images[i].numpy()                                                     # (S, S, 3)
        axes[i, 0].imshow(img)
        for j, m in enumerate(maps.values(), start=1):
            axes[i, j].imshow(img)
            axes[i, j].imshow(m[i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for ax, name in zip(axes[0], ["image", *maps]):
        ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"attention sum_c |a|^{power:g}: {title}", fontsize=8)
    return save(fig, path)


def first_conv(trunk: nn.Module) -> nn.Conv2d:
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            return m
    raise ValueError("trunk has no conv layer with 3 input channels")


def plot_filters(conv: nn.Conv2d, title: str, path: Path, max_filters: int = 96) -> Path:
    w = unit_range(conv.weight.detach().float()[:max_filters]).permute(0, 2, 3, 1).numpy()   # (C, k, k, 3)
    cols = min(16, len(w))
    rows = math.ceil(len(w) / cols)
    fig, axes = subplots(rows, cols, figsize=(0.5 * cols, 0.5 * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, f in zip(axes.flat, w):
        ax.imshow(f, interpolation="nearest")
    fig.suptitle(f"first conv filters {tuple(conv.weight.shape)}: {title}", fontsize=7)
    return save(fig, path)


def read_json(path: Path, text: str | None = None, where: str = ""):
    """json.loads(text, default: the file's), a UsageError naming path (and `where` in it) if it is
    missing or not JSON."""
    if text is None and not path.is_file():
        raise UsageError(f"{path}: file not found")
    try:
        return json.loads(path.read_text() if text is None else text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}{where}: not JSON ({e})") from e


def read_log(path: Path) -> list[dict]:
    """log.jsonl -> per-epoch records; a resumed run's repeated epoch keeps its last record."""
    by_epoch: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            rec = read_json(path, line, f":{n}")
            by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_curves(records: list[dict], title: str, path: Path) -> Path:
    ep = [r["epoch"] + 1 for r in records]   # epoch e is logged after it completes: x = epochs done
    knn = [(e, r["knn_top1"]) for e, r in zip(ep, records) if r.get("knn_top1")]   # train.monitor_every
    fig, axes = subplots(1, 3 if knn else 2, figsize=(12 if knn else 8, 3))
    a1, a2 = axes[:2]
    a1.plot(ep, [r["loss"] for r in records], "o-", ms=3)
    a1.set(xlabel="epochs", ylabel="rotation loss (train)", title="loss")
    a2.plot(ep, [100 * r["rot_acc"] for r in records], "o-", ms=3, label="train")
    held = [(e, 100 * r["heldout_rot_acc"]) for e, r in zip(ep, records)
            if r.get("heldout_rot_acc") is not None]
    if held:
        a2.plot(*zip(*held), "s-", ms=3, label="held-out")
    a2.set(xlabel="epochs", ylabel="rotation accuracy (%)", title="rotation accuracy")
    a2.legend(fontsize=8)
    if knn:   # the representation, which can stall while rotation accuracy still rises (paper Sec. 3)
        for layer in dict.fromkeys(name for _, v in knn for name in v):
            pts = [(e, v[layer]) for e, v in knn if layer in v]
            axes[2].plot(*zip(*pts), "^-", ms=3, label=layer)
        axes[2].set(xlabel="epochs", ylabel="kNN top-1 (%)", title="kNN top-1 (labelled subset)")
        axes[2].legend(fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=8)
    return save(fig, path)


def plot_layers(evals: list[tuple[str, dict]], path: Path) -> Path:
    """One panel per eval.json: grouped top-1 bars per layer for each model in it (pretrained, random)."""
    fig, axes = subplots(1, len(evals), figsize=(4.2 * len(evals), 3.2), squeeze=False)
    for ax, (label, ev) in zip(axes[0], evals):
        models = ([m for m in ("pretrained", "random") if m in ev]
                  or [k for k, v in ev.items() if k not in ("meta", "difference_top1")
                      and isinstance(v, dict)])
        draw_top1_bars(ax, {m: ev[m] for m in models}, fontsize=6)
        ax.set_title(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def eval_label(path: Path, ev: dict) -> str:
    meta = ev.get("meta", {})
    k = meta.get("labels_per_class")
    return (f"{meta.get('arch', '')} {meta.get('head', '?')} probes, {meta.get('epochs', '?')} ep"
            + (f", {k} labels/class" if k else "") + f"\n{path.parent.name}")


# ---------------------------------------------------------------------------- main

def get_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--run", type=Path, help="run folder (log.jsonl, config.yaml, checkpoint.pt)")
    p.add_argument("--checkpoint", help="checkpoint for attention/filters (default RUN/checkpoint.pt); "
                                        "'random' = random init of the run's config")
    p.add_argument("--config", help="config when there is no checkpoint (default RUN/config.yaml)")
    p.add_argument("--eval-json", type=Path, nargs="*", default=[], help="eval.json files (one panel each)")
    p.add_argument("--data-root", help="image folder root (default: the config's data.root)")
    p.add_argument("--split", help="split folder for the attention images (default: data.val_dir)")
    p.add_argument("--images", type=number(int, 1), default=6,
                   help="attention-map images (spread over classes)")
    p.add_argument("--power", type=number(float, 0, strict=True), default=2.0,
                   help="p in sum_c |a|^p (paper Fig. 3)")
    p.add_argument("--title", default="", help="extra text for the figure titles")
    p.add_argument("--out", required=True, help="output prefix, e.g. docs/figures/cifar10")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> list[Path]:
    args = get_args(argv)
    try:
        return draw(args)
    except InputError as e:   # a missing or bad checkpoint, config, eval.json or --out: one line, exit 2
        fail(e)


def draw(args: argparse.Namespace) -> list[Path]:
    """Every figure whose inputs exist; returns the files written."""
    out = Path(args.out)
    make_folder(out.parent, "--out's folder")
    written: list[Path] = []

    log_path = args.run / "log.jsonl" if args.run else None
    if log_path is not None and log_path.is_file() and (records := read_log(log_path)):
        written.append(plot_curves(records, f"{args.run} {args.title}".strip(), Path(f"{out}_curves.png")))
    else:
        print(f"visualize: no training log ({log_path}); curves skipped", file=sys.stderr)

    if args.checkpoint or args.run:
        cfg, trunk, what = load_run(args.run, args.checkpoint, args.config)
        what = f"{what} {args.title}".strip()
        written.append(plot_filters(first_conv(trunk), what, Path(f"{out}_filters.png")))
        root = args.data_root or cfg.data.root
        split = Path(root) / (args.split or cfg.data.val_dir) if root else None
        if split is not None and split.is_dir():
            images = load_images(pick_images(split, args.images, cfg.data.format), cfg)
            maps = attention_maps(trunk, prepare_batch(images, cfg.data, channels_last=False), args.power)
            written.append(plot_attention(images, maps, args.power, what, Path(f"{out}_attention.png")))
        else:
            print(f"visualize: image folder {split} not found (--data-root); attention maps skipped",
                  file=sys.stderr)

    evals = [(eval_label(p, ev), ev) for p in args.eval_json for ev in [read_json(p)]]
    if evals:
        written.append(plot_layers(evals, Path(f"{out}_layers.png")))
    for p in written:
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KB)")
    return written


if __name__ == "__main__":
    main()
