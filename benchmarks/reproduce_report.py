"""docs/results.md and the semi-supervised curve, from the outputs of benchmarks/reproduce_cifar.py.

Reads RUNS/BUDGET/{main,ablation_*,semisup/*}/ (step.json: command, wall time, machine;
pretrain/log.jsonl; eval_*/eval.json) and renders one section per budget, paper numbers beside ours.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# Paper numbers (Gidaris et al., ICLR 2018), CIFAR-10 (PNG), NIN with 4 blocks.
PAPER_TABLE1 = {"block1": 85.07, "block2": 89.06, "block3": 86.21, "block4": 61.73}  # non-linear probes
PAPER_TABLE2 = {"rot_4": 89.06, "rot_8x45": 88.51, "rot_0_180": 87.46, "rot_90_270": 85.52}  # block2
PAPER_TABLE3 = {"RotNet + conv": 91.16, "Random init + conv": 72.50, "Supervised NIN": 92.80}
BUDGET_ORDER = ("paper", "cpu-30min", "smoke")
NOTES_RE = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.S)
# The Imagenette section belongs to benchmarks/reproduce_imagenette.py: kept verbatim here.
IMAGENETTE_RE = re.compile(r"<!-- imagenette -->.*?<!-- /imagenette -->", re.S)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _log(run: Path) -> list[dict]:
    f = run / "pretrain" / "log.jsonl"
    if not f.is_file():
        return []
    by_epoch = {}
    for line in f.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_epoch[r["epoch"]] = r
    return [by_epoch[e] for e in sorted(by_epoch)]


def _pct(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _short(cmd: str, root: Path) -> str:
    return cmd.replace(f"{root}/", "")


def plot_semisup(semisup: Path, out: Path, budget: str) -> Path | None:
    """Paper Fig. 5b: top-1 vs labels/class, RotNet (frozen block2 + conv head) vs from scratch."""
    rows = _semisup_rows(semisup)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for key, label, style in (("rotnet", "RotNet block2 (frozen) + conv head", "o-"),
                              ("scratch", "same net from scratch (K labels)", "s--")):
        pts = [(k, r[key]) for k, r in rows.items() if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xscale("log")
    ax.set_xticks(list(rows), [str(k) for k in rows])   # label the K values only (no log minor labels)
    ax.minorticks_off()
    ax.set(xlabel="labelled images per class (K)", ylabel="CIFAR-10 (JPEG) test top-1 (%)",
           title=f"semi-supervised, budget {budget}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _semisup_rows(semisup: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for d in sorted(semisup.glob("*_k*")) if semisup.is_dir() else []:
        kind, k = d.name.rsplit("_k", 1)
        ev = _json(d / "eval.json")
        if ev is None:
            continue
        model = ev.get("pretrained") or ev.get("random") or {}
        if "block2" in model:
            rows.setdefault(int(k), {})[kind] = model["block2"]["top1"]
            rows[int(k)][kind + "_wall"] = (_json(d / "step.json") or {}).get("wall_s")
    return dict(sorted(rows.items()))


def _machine(rec: dict | None) -> str:
    if not rec:
        return "?"
    m = rec.get("machine", {})
    dev = m.get("gpu") or f"CPU only ({m.get('cores')} cores)"
    return f"{dev}; CPU {m.get('cpu')}; torch {m.get('torch')}"


def _budget_section(base: Path, budget: str, figures: Path, root: Path) -> list[str]:
    main = base / "main"
    pre = _json(main / "step.json")
    L = [f"## Budget `{budget}`", ""]
    if pre is None:
        return L + ["Not run yet.", ""]
    log = _log(main)
    last = log[-1] if log else {}
    L += [f"- machine: {_machine(pre)}", f"- code commit: `{pre.get('commit')}`",
          f"- data: CIFAR-10 (JPEG) (`{base.name == 'smoke' and 'symlinked subset of ' or ''}cifar10-jpeg`), "
          "pretraining on train (50k), probes trained on train, scored on test (10k)", ""]

    # ---- pretraining runs
    L += ["### Pretraining", "", "| run | epochs | steps | wall time | train rot. acc | held-out rot. acc |",
          "|---|---:|---:|---:|---:|---:|"]
    runs = [main] + sorted(base.glob("ablation_*"))
    for r in runs:
        rec, lg = _json(r / "step.json"), _log(r)
        if rec is None:
            continue
        e = lg[-1] if lg else {}
        held = e.get("heldout_rot_acc")
        L.append(f"| {r.name} | {len(lg)} | {e.get('step', '–')} | {rec['wall_s'] / 60:.1f} min"
                 f"{'' if rec['rc'] == 0 else ' (FAILED rc=' + str(rec['rc']) + ')'} | "
                 f"{_pct(100 * e['rot_acc'] if e else None)} | "
                 f"{_pct(100 * held if held is not None else None)} |")
    L.append("")

    # ---- per-block probes
    checks = []
    for ev_path in sorted(main.glob("eval_*/eval.json")):
        ev = json.loads(ev_path.read_text())
        meta, rec = ev["meta"], _json(ev_path.parent / "step.json") or {}
        pre_, rnd = ev.get("pretrained", {}), ev.get("random", {})
        L += [f"### Frozen blocks, `{meta['head']}` probes ({meta['epochs']} epochs, all labels; "
              f"eval wall time {rec.get('wall_s', 0) / 60:.1f} min)", "",
              "| block | RotNet top-1 | random-init top-1 | RotNet − random | paper RotNet (Table 1) |",
              "|---|---:|---:|---:|---:|"]
        for layer, m in pre_.items():
            r = rnd.get(layer, {}).get("top1")
            L.append(f"| {layer} | {m['top1']:.2f} | {_pct(r)} | "
                     f"{_pct(None if r is None else m['top1'] - r)} | {PAPER_TABLE1.get(layer, '–')} |")
        L.append("")
        if pre_ and rnd:
            gaps = {k: pre_[k]["top1"] - rnd[k]["top1"] for k in pre_}
            best = max(pre_, key=lambda k: pre_[k]["top1"])
            worst = min(pre_, key=lambda k: pre_[k]["top1"])
            layers = list(pre_)
            checks += [(f"{meta['head']}: best block ({best}) ≥ 10 points above random init",
                        gaps[best] >= 10, f"{gaps[best]:+.2f}"),
                       (f"{meta['head']}: best block is an early/middle block, last block worst",
                        best in layers[:-1] and worst == layers[-1], f"best {best}, worst {worst}")]
    held = last.get("heldout_rot_acc")
    checks.insert(0, ("held-out rotation accuracy ≥ 80%", held is not None and held >= 0.8,
                      _pct(100 * held if held is not None else None)))
    L += ["### Bars", "", "| bar | met | measured |", "|---|:---:|---|"]
    L += [f"| {name} | {'yes' if ok else 'NO'} | {val} |" for name, ok, val in checks] + [""]

    # ---- ablations
    abl = sorted(base.glob("ablation_*/eval_*/eval.json"))
    main_ev = next(iter(sorted(main.glob("eval_*/eval.json"))), None)
    if abl:
        rows = [(p.parents[1].name.removeprefix("ablation_"), p) for p in abl]
        own_default = any(name == "rot_4" for name, _ in rows)   # ablations ran at their own budget
        if not own_default and main_ev:
            rows.insert(0, ("rot_4", main_ev))
        rows.sort(key=lambda r: r[0] != "rot_4")
        ep = len(_log(rows[0][1].parents[1]))
        budget_txt = (f"each pretrained {ep} epoch(s), a smaller budget than the main run; same probe"
                      if own_default else "same budget and probe as the main run")
        L += [f"### Ablations ({budget_txt})", "",
              "| rotations | held-out rot. acc | block1 | block2 | block3 | block4 "
              "| paper block2 (Table 2) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for name, p in rows:
            ev = json.loads(p.read_text())["pretrained"]
            lg = _log(p.parents[1])
            h = lg[-1].get("heldout_rot_acc") if lg else None
            label = {"rot_4": "0/90/180/270 (default)" if own_default else "0/90/180/270 (default, main run)",
                     "one_random": "0/90/180/270, one random per image"}.get(name, name)
            L.append(f"| {label} | {_pct(100 * h if h is not None else None)} | "
                     + " | ".join(_pct(ev.get(f"block{i}", {}).get("top1")) for i in range(1, 5))
                     + f" | {PAPER_TABLE2.get(name, '–')} |")
        L.append("")

    # ---- semi-supervised
    rows = _semisup_rows(base / "semisup")
    if rows:
        L += ["### Semi-supervised (paper Fig. 5b): block2 + conv head", "",
              "| K labels/class | RotNet (frozen) + conv | from scratch (same net) | difference |",
              "|---:|---:|---:|---:|"]
        for k, r in rows.items():
            a, s = r.get("rotnet"), r.get("scratch")
            diff = a - s if a is not None and s is not None else None
            L.append(f"| {k} | {_pct(a)} | {_pct(s)} | {_pct(diff)} |")
        L += ["", "Paper (Fig. 5b, CIFAR-10): the RotNet-based model beats the supervised one when the "
              "labelled images per class are few (up to about 1000 per class); the curves cross only near "
              "the full 5000.", ""]

    # ---- figures and commands
    pngs = sorted(figures.glob(f"cifar10_{budget}_*.png"))
    if pngs:
        L += ["### Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in pngs] + [""]
    cmds = [(_json(d / "step.json") or {}) for d in [main, *sorted(main.glob("eval_*")), *runs[1:],
                                                    *sorted(base.glob("ablation_*/eval_*")),
                                                    *sorted((base / "semisup").glob("*_k*"))]]
    L += ["<details><summary>Exact commands (run from the repo root; wall times)</summary>", "", "```"]
    L += [f"# {c['wall_s'] / 60:.1f} min, rc {c['rc']}\n{_short(c['cmd'], root)}" for c in cmds if c]
    L += ["```", "", "</details>", ""]
    return L


def write_results(runs: Path, results: Path, figures: Path, root: Path) -> None:
    old = results.read_text() if results.is_file() else ""
    notes = NOTES_RE.search(old)
    notes_text = notes.group(0) if notes else "<!-- notes -->\n<!-- /notes -->"
    L = ["# Reproducing RotNet on CIFAR-10 (JPEG)", "",
         "Generated by `benchmarks/reproduce_cifar.py` (tables, commands, wall times) — rerun it to "
         "refresh; only the notes block below is written by hand.", "",
         "Paper: Gidaris, Singh, Komodakis, *Unsupervised Representation Learning by Predicting Image "
         "Rotations*, ICLR 2018; numbers quoted from its Tables 1–3 (CIFAR-10 PNG, NIN-4, 100 epochs). "
         f"Paper Table 3: {', '.join(f'{k} {v}' for k, v in PAPER_TABLE3.items())}.", "",
         notes_text, ""]
    budgets = [b for b in BUDGET_ORDER if (runs / b).is_dir()]
    for b in budgets:
        L += _budget_section(runs / b, b, figures, root)
    if not budgets:
        L += ["No budget has been run yet.", ""]
    imagenette = IMAGENETTE_RE.search(old)
    if imagenette:
        L += [imagenette.group(0), ""]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n".join(L))
