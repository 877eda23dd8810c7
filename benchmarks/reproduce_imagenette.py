#!/usr/bin/env python
"""Show the ImageNet recipe learning on real photos: RotNet AlexNet and ResNet-18 on Imagenette.

    python benchmarks/reproduce_imagenette.py --data ../shared/datasets/imagenette-224 --budget smoke
    python benchmarks/reproduce_imagenette.py --data ../shared/datasets/imagenette-224 --budget cpu-30min
    python benchmarks/reproduce_imagenette.py --data DATA --budget cpu-30min --models resnet18 --stages eval

Stages, per model (subprocesses of train.py / eval.py / visualize.py, outputs under
RUNS/BUDGET/MODEL/; a step whose `step.json` says it finished is skipped, so a rerun resumes):
    pretrain   RotNet on data/train (random-resized-crop + flip, all four rotations per crop)
    eval       linear probes on every layer (the paper's max-pool to ~9k dims + BN + linear,
               Table 5), RotNet beside random init, from one eval.py command
    figures    visualize.py: per-layer bars, attention maps on val photos, conv1 filters, curves
Every run ends by rewriting the Imagenette section of docs/results.md (between
<!-- imagenette --> and <!-- /imagenette -->; the hand-written block between
<!-- imagenette notes --> and <!-- /imagenette notes --> is kept; the CIFAR part of the
file is left alone). The bars: see BARS.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reproduce_cifar import make_subset, step  # noqa: E402
from benchmarks.reproduce_report import _json, _log, _machine, _pct, _short  # noqa: E402
from rotnet.config import load_config  # noqa: E402

STAGES = ("pretrain", "eval", "figures")
MODELS = {"alexnet": "configs/imagenette_alexnet_cpu.yaml",
          "resnet18": "configs/imagenette_resnet18_cpu.yaml"}
# Budgets. train/eval: extra train.py / eval.py arguments; subset: (train, val) images per class
# symlinked for the smoke budget; eval_epochs None = the config's probe.epochs.
BUDGETS = {
    "smoke": dict(train=["optim.epochs=1", "optim.schedule=[[0,0.05]]", "model.width=0.25",
                         "optim.batch_size_per_gpu=4"],
                  eval=["--batch-size", "4"], subset=(8, 4), eval_epochs=1),
    "cpu-30min": dict(train=[], eval=[], subset=None, eval_epochs=None),
}
WALL_CAP_MIN = 30          # pretraining <= 30 min of train.py wall time on the 2-core CPU
BLOCK_RE = re.compile(r"<!-- imagenette -->.*?<!-- /imagenette -->", re.S)
NOTES_RE = re.compile(r"<!-- imagenette notes -->.*?<!-- /imagenette notes -->", re.S)


# ---------------------------------------------------------------- bars (never lowered)

def bars(arch: str, pre: dict[str, float], rnd: dict[str, float]) -> list[tuple[str, bool, str]]:
    """(bar, met, measured) for one model's linear probes: pre/rnd map layer -> top-1 (%)."""
    best = max(pre, key=pre.get)
    best_rnd = max(rnd, key=rnd.get)
    gap = pre[best] - rnd[best_rnd]
    need = 15 if arch == "alexnet" else 5
    out = [(f"best layer ≥ {need} points above random init's best layer", gap >= need,
            f"{best} {pre[best]:.2f} vs random {best_rnd} {rnd[best_rnd]:.2f}: {gap:+.2f}")]
    if arch == "alexnet":
        out.append(("a middle layer (conv2-conv4) is best, conv5 below it",
                    best in ("conv2", "conv3", "conv4") and pre["conv5"] < pre[best],
                    f"best {best}, conv5 {pre['conv5']:.2f}"))
    else:
        for layer in ("layer2", "layer3", "layer4"):
            d = pre[layer] - rnd[layer]
            out.append((f"{layer} ≥ 10 points above random-init {layer}", d >= 10, f"{d:+.2f}"))
    return out


# ---------------------------------------------------------------- docs/results.md section

def _load(run: Path) -> str:
    """Load averages recorded around a step (the machine is shared: wall times need them)."""
    rec = _json(run / "step.json") or {}
    b, a = rec.get("load_before"), rec.get("load_after")
    return "–" if b is None else f"{b[0]:.2f} → {a[0]:.2f}"


def section(runs: Path, figures: Path, root: Path) -> list[str]:
    """Markdown for every budget and model found under `runs` (RUNS/BUDGET/MODEL/...)."""
    L = []
    for base in [runs / b for b in BUDGETS if (runs / b).is_dir()]:
        for arch in [m for m in MODELS if (base / m / "step.json").is_file()]:
            run = base / arch
            rec, log = _json(run / "step.json"), _log(run)
            last = log[-1] if log else {}
            held = last.get("heldout_rot_acc")
            wall = rec["wall_s"] / 60
            L += [f"### {arch}, budget `{base.name}`", "",
                  f"- machine: {_machine(rec)}; code commit `{rec.get('commit')}`",
                  f"- pretraining: {len(log)} epochs, {last.get('step', '–')} steps, **{wall:.1f} min** "
                  f"train.py wall time (load average 1 min before → after: {_load(run)}), "
                  f"train rotation acc {_pct(100 * last['rot_acc'] if last else None)}%, "
                  f"held-out rotation acc **{_pct(100 * held if held is not None else None)}%** (chance 25%)"]
            ev = _json(run / "eval_linear" / "eval.json")
            checks = [(f"pretraining ≤ {WALL_CAP_MIN} min (train.py wall time)",
                       rec["rc"] == 0 and wall <= WALL_CAP_MIN, f"{wall:.1f} min")]
            if ev:
                erec = _json(run / "eval_linear" / "step.json") or {}
                pre = {k: v["top1"] for k, v in ev["pretrained"].items()}
                rnd = {k: v["top1"] for k, v in ev.get("random", {}).items()}
                L += [f"- linear probes: {ev['meta']['epochs']} epochs on train, scored on the full val; "
                      f"eval wall time {erec.get('wall_s', 0) / 60:.1f} min (RotNet and random init, "
                      f"load {_load(run / 'eval_linear')})", "",
                      "| layer | RotNet top-1 | random-init top-1 | RotNet − random |",
                      "|---|---:|---:|---:|"]
                for layer, a in pre.items():
                    r = rnd.get(layer)
                    L.append(f"| {layer} | {a:.2f} | {_pct(r)} | {_pct(None if r is None else a - r)} |")
                if rnd:
                    checks += bars(arch, pre, rnd)
            L += ["", "| bar | met | measured |", "|---|:---:|---|"]
            L += [f"| {n} | {'yes' if ok else 'NO'} | {v} |" for n, ok, v in checks] + [""]
            pngs = sorted(figures.glob(f"imagenette_{arch}_{base.name}_*.png"))
            L += [f"![{p.stem}](figures/{p.name})" for p in pngs] + ([""] if pngs else [])
            cmds = [c for c in (_json(d / "step.json") for d in (run, run / "eval_linear")) if c]
            L += ["<details><summary>Exact commands (run from the repo root; wall times)</summary>",
                  "", "```"]
            L += [f"# {c['wall_s'] / 60:.1f} min, rc {c['rc']}\n{_short(c['cmd'], root)}" for c in cmds]
            L += ["```", "", "</details>", ""]
    return L or ["No Imagenette run yet.", ""]


def write_section(runs: Path, results: Path, figures: Path, root: Path) -> None:
    """Replace (or append) the Imagenette block of `results`, keeping its hand-written notes."""
    old = results.read_text() if results.is_file() else ""
    block = BLOCK_RE.search(old)
    notes = NOTES_RE.search(block.group(0)) if block else None
    body = ["<!-- imagenette -->",
            "# Imagenette: the ImageNet recipe on real photos (AlexNet, ResNet-18)", "",
            "Generated by `benchmarks/reproduce_imagenette.py`; only the notes block is written by hand.", "",
            notes.group(0) if notes else "<!-- imagenette notes -->\n<!-- /imagenette notes -->", "",
            *section(runs, figures, root), "<!-- /imagenette -->"]
    text = "\n".join(body)
    if block:
        new = BLOCK_RE.sub(lambda _: text, old)
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text + "\n"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(new)


# ---------------------------------------------------------------- stages

def shrink_png(path: Path) -> None:
    """Photos under heat maps make ~1 MB PNGs: a 256-colour palette keeps docs/figures small (~4x)."""
    if path.is_file():
        from PIL import Image
        img = Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
        img.save(path, optimize=True)


def timed_step(out: Path, cmd: list[str], dry: bool) -> None:
    """benchmarks.reproduce_cifar.step, with the load average before and after recorded in step.json."""
    before = os.getloadavg()
    done = (out / "step.json").is_file() and (_json(out / "step.json") or {}).get("rc") == 0
    rec = step(out, cmd, dry)
    if rec is not None and not done:
        rec.update(load_before=before, load_after=os.getloadavg())
        (out / "step.json").write_text(json.dumps(rec, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Imagenette in ImageNet layout (train/, val/)")
    p.add_argument("--budget", choices=list(BUDGETS), default="smoke")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--runs", type=Path, default=ROOT / "runs/reproduce_imagenette",
                   help="outputs: RUNS/BUDGET/MODEL/")
    p.add_argument("--figures", type=Path, default=ROOT / "docs/figures", help="PNG folder")
    p.add_argument("--results", type=Path, default=ROOT / "docs/results.md")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every pretraining run")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for given, valid, what in ((stages, STAGES, "stage"), (models, MODELS, "model")):
        if set(given) - set(valid):
            p.error(f"unknown {what}(s) {sorted(set(given) - set(valid))}; valid: {list(valid)}")
    b = BUDGETS[args.budget]
    base = args.runs / args.budget
    data = Path(args.data).resolve()
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        p.error(f"--data {data}: expected ImageNet layout train/CLASS/IMG and val/CLASS/IMG")
    if b["subset"]:
        data = make_subset(data, base / "data", b["subset"], splits=("train", "val"))
    py = sys.executable
    for arch in models:
        run = base / arch
        ckpt = run / "pretrain" / "checkpoint.pt"
        if "pretrain" in stages:
            timed_step(run, [py, "train.py", "--config", MODELS[arch], f"data.root={data}", *b["train"],
                             *args.overrides, f"train.output_dir={run / 'pretrain'}"], args.dry_run)
        if "eval" in stages:
            epochs = ["--epochs", str(b["eval_epochs"])] if b["eval_epochs"] else []
            # eval.py defaults to bf16; probe in the precision the config pretrains in (fp32 here:
            # bf16 is emulated, hence slow, on CPUs without AVX512-BF16/AMX)
            precision = load_config(ROOT / MODELS[arch], [*b["train"], *args.overrides]).train.precision
            timed_step(run / "eval_linear",
                       [py, "eval.py", "--checkpoint", str(ckpt), "--layer", "all", "--head", "linear",
                        *epochs, *b["eval"], "--with-random", "--precision", precision, "--output-dir",
                        str(run / "eval_linear"), f"data.root={data}"], args.dry_run)
        if "figures" in stages:
            (run / "figures" / "step.json").unlink(missing_ok=True)   # figures always redrawn
            prefix = args.figures / f"imagenette_{arch}_{args.budget}"
            step(run / "figures", [py, "visualize.py", "--run", str(run / "pretrain"),
                                   "--data-root", str(data),
                                   "--eval-json", str(run / "eval_linear" / "eval.json"), "--images", "4",
                                   "--out", str(prefix), "--title", f"(Imagenette, {args.budget})"],
                 args.dry_run)
            if not args.dry_run:
                shrink_png(Path(f"{prefix}_attention.png"))
    if not args.dry_run:
        write_section(args.runs, args.results, args.figures, ROOT)
        print(f"wrote the Imagenette section of {args.results}")


if __name__ == "__main__":
    main()
