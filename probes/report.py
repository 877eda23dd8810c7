"""Eval outputs: eval.json, eval.md (table), eval.png (bar chart).

    results = {"pretrained": {"conv1": {"top1": 31.2, "top5": 55.0, "count": 50000}, ...}, "random": {...}}
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from rotnet.atomic import write_bytes, write_text

MODEL_TITLES = {"pretrained": "RotNet pretrained", "random": "random init"}


def _title(name: str) -> str:
    return MODEL_TITLES.get(name, name)


def to_json(results: dict[str, dict], meta: dict) -> dict:
    """One self-describing record per (model, layer), plus the pretrained - random gap."""
    out: dict = {"meta": meta}
    for model, layers in results.items():
        ckpt = meta["checkpoint"] if model == "pretrained" else f"random init (seed {meta['seed']})"
        out[model] = {
            layer: {"top1": m["top1"], "top5": m["top5"], "num_val": m["count"], "head": meta["head"],
                    "epochs": meta["epochs"], "checkpoint": ckpt, "commit": meta["commit"],
                    "labels_per_class": meta["labels_per_class"]}
            for layer, m in layers.items()
        }
    if "pretrained" in results and "random" in results:
        pre, rand = results["pretrained"], results["random"]
        out["difference_top1"] = {layer: pre[layer]["top1"] - rand[layer]["top1"] for layer in pre}
    return out


def markdown_table(results: dict[str, dict], meta: dict) -> str:
    """Markdown table: one row per layer; pretrained vs random side by side when both ran."""
    models = list(results)
    layers = list(results[models[0]])
    n_val = results[models[0]][layers[0]]["count"]
    labels = "all labels" if not meta["labels_per_class"] else f"{meta['labels_per_class']} labels/class"
    knn = meta.get("knn")
    how = (f"weighted k-NN (k={knn['k']}, T={knn['T']}, {knn['similarity']} on {knn['pool']}-pooled "
           f"features), no training, bank {knn['bank']} with {labels}" if knn
           else f"{meta['epochs']} epochs, {labels}")
    lines = [f"Frozen-layer **{meta['head']}** probes on {meta['arch']}: top-1 / top-5 (%) on "
             f"{n_val} val images; {how}" + (", trunk fine-tuned" if meta.get("finetune") else "") + ".", ""]
    both = "pretrained" in results and "random" in results
    if both:   # side by side, with their difference
        models, names = ["pretrained", "random"], {"pretrained": "pretrained", "random": "random-init"}
    else:
        names = {m: _title(m) for m in models}
    diff = ["difference (pretrained - random)"] if both else []
    head = ["layer", *(f"{names[m]} top-1" for m in models), *diff, *(f"{names[m]} top-5" for m in models)]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for layer in layers:
        r = {m: results[m][layer] for m in models}
        diff = [f"{r['pretrained']['top1'] - r['random']['top1']:+.2f}"] if both else []
        cells = [f"{r[m]['top1']:.2f}" for m in models] + diff + [f"{r[m]['top5']:.2f}" for m in models]
        lines.append("| " + " | ".join([layer] + cells) + " |")
    lines.append("")
    if "pretrained" in results:
        lines.append(f"pretrained = {meta['checkpoint']}")
    if "random" in results:
        lines.append(f"random init = same architecture ({meta['arch']}), random weights, seed {meta['seed']}")
    if meta.get("wall_time_s"):
        times = meta["wall_time_s"].items()
        lines.append("wall time: " + ", ".join(f"{_title(m)} {s:.1f} s" for m, s in times))
    lines.append(f"code commit {meta['commit']}")
    return "\n".join(lines) + "\n"


def draw_top1_bars(ax, results: dict[str, dict], fontsize: int = 7) -> None:
    """Top-1 per layer as grouped bars on `ax`, random init beside pretrained (also visualize.py's)."""
    models = list(results)
    layers = list(results[models[0]])
    width = 0.8 / len(models)
    colors = {"pretrained": "tab:blue", "random": "tab:gray"}
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(layers))]
        ys = [results[model][layer]["top1"] for layer in layers]
        bars = ax.bar(xs, ys, width, label=_title(model), color=colors.get(model))
        ax.bar_label(bars, fmt="%.1f", fontsize=fontsize)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=fontsize + 1)


def bar_chart(results: dict[str, dict], meta: dict, path: Path) -> None:
    """eval.png: `draw_top1_bars` titled with the protocol."""
    import matplotlib
    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(next(iter(results.values()))), 3.6))
    draw_top1_bars(ax, results)
    how = f"k={meta['knn']['k']}, no training" if meta.get("knn") else f"{meta['epochs']} epochs"
    ax.set_title(f"{meta['arch']}: frozen-layer {meta['head']} probes ({how})", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()   # then one atomic write: a full disk is a DiskFullError, not half a PNG
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, png.getbuffer())


def write_reports(results: dict[str, dict], meta: dict, out_dir: Path) -> str:
    """Write eval.json, eval.md, eval.png into out_dir; return the Markdown table."""
    write_text(out_dir / "eval.json", json.dumps(to_json(results, meta), indent=2) + "\n")
    table = markdown_table(results, meta)
    write_text(out_dir / "eval.md", table)
    bar_chart(results, meta, out_dir / "eval.png")
    return table
