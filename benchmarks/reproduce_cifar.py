#!/usr/bin/env python
"""Reproduce the paper's CIFAR-10 findings (Gidaris et al., ICLR 2018) on real data, end to end.

    python benchmarks/reproduce_cifar.py --data ../shared/datasets/cifar10-jpeg --budget smoke
    python benchmarks/reproduce_cifar.py --data ../shared/datasets/cifar10-jpeg --budget cpu-30min
    python benchmarks/reproduce_cifar.py --data DATA --budget paper --stages pretrain,eval

Stages (each a subprocess of train.py / eval.py / visualize.py, outputs under
runs/reproduce/BUDGET/; a step whose `step.json` says it finished is skipped, so a rerun
resumes, and --stages picks what to run):
    pretrain   RotNet NIN-4 on data/train (configs/cifar10_nin*.yaml)
    eval       frozen-block probes on every block, RotNet vs random init (paper Table 1)
    ablations  rotation sets {0,180}, {90,270}, 8 x 45 degrees (Table 2) and one_random
               (one random rotation per image instead of all four, same steps and samples per step),
               each against the default 4 rotations pretrained at the same ablation budget
               (cpu-30min: 1 of the main run's 5 epochs, so five runs fit a working session)
    semisup    K labels/class: RotNet block2 frozen + conv head vs the same network (blocks 1-2 +
               conv head, the paper's 3-block NIN) trained from scratch on the K labels (Fig. 5b)
    figures    visualize.py (attention, filters, curves, per-block bars) + the semi-sup curve
Every run ends by rewriting docs/results.md from all budgets found under --runs (text between
<!-- notes --> and <!-- /notes --> in the old file is kept).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import cpu_name  # noqa: E402
from benchmarks.reproduce_report import write_results  # noqa: E402

STAGES = ("pretrain", "eval", "ablations", "semisup", "figures")
ABLATIONS = {  # name -> train.py overrides (paper Table 2, plus one_random)
    "rot_4": [],  # the default {0,90,180,270}, at the ablation budget: the row the others face
    "rot_0_180": ["data.rotations=[0,180]"],
    "rot_90_270": ["data.rotations=[90,270]"],
    "rot_8x45": ["data.rotations=[0,45,90,135,180,225,270,315]"],
    "one_random": ["data.rotation_mode=one_random"],
}
# Budgets. pretrain: config + overrides. eval: heads with (epochs, extra eval.py args).
# semisup_samples: training images seen per K run (the original code fixes an epoch at 50k
# images whatever K is), so every K gets the same number of steps.
BUDGETS = {
    "smoke": dict(config="configs/cifar10_nin_cpu.yaml",
                  train=["model.width=0.25", "optim.epochs=1", "optim.batch_size_per_gpu=32",
                         "train.compile=false", "optim.schedule=[[0,0.05]]"],
                  subset=(60, 20), eval={"mlp": 1}, ablations=["one_random"],
                  ablation_train=[], semisup_ks=[20, 50], semisup_samples=2000),
    # cpu-30min on the quiet 2-core Xeon: 5 compiled pretraining epochs (the config), 28.6 min; 3 MLP probe
    # epochs (RotNet + random init, paper's milestones stretched) to keep eval near 10 min.
    # (The earlier H100 run of this budget used 2 pretraining epochs and 8 probe epochs.)
    # Ablations here get 1 of the main run's 5 epochs each (the main schedule's shape; ~6 min
    # per run): five 30-minute runs would not fit a working session on two cores.
    "cpu-30min": dict(config="configs/cifar10_nin_cpu.yaml", train=[], subset=None,
                      eval={"mlp": 3}, ablations=list(ABLATIONS),
                      ablation_train=["optim.epochs=1", "optim.schedule=[[0,0.05],[0.6,0.01],[0.85,0.002]]"],
                      semisup_ks=[20, 100, 400, 1000], semisup_samples=200_000),
    "paper": dict(config="configs/cifar10_nin.yaml", train=[], subset=None,
                  eval={"mlp": 50, "conv": 100}, ablations=list(ABLATIONS), ablation_train=[],
                  semisup_ks=[20, 100, 400, 1000, 5000], semisup_samples=100 * 50_000),
}
MLP_SCHEDULE = "probe.schedule=[[0,0.1],[20,0.02],[40,0.004],[45,0.0008]]"  # paper's 50-epoch FC probe
MLP_EPOCHS = 50


def machine() -> dict:
    info = {"host": platform.node(), "cpu": cpu_name(), "cores": os.cpu_count(), "gpu": None}
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def commit() -> str:
    if os.environ.get("REPRO_COMMIT"):
        return os.environ["REPRO_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def step(out: Path, cmd: list[str], dry: bool) -> dict | None:
    """Run `cmd` unless out/step.json records a finished run; write step.json (command, wall time,
    machine)."""
    marker = out / "step.json"
    if marker.is_file() and json.loads(marker.read_text()).get("rc") == 0:
        print(f"[skip] {out} (done)")
        return json.loads(marker.read_text())
    shown = " ".join(cmd).replace(sys.executable, "python")
    print(f"[run] {shown}", flush=True)
    if dry:
        return None
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "stdout.log", "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    rec = {"cmd": shown, "rc": rc, "wall_s": round(time.time() - t0, 1), "commit": commit(),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine()}
    marker.write_text(json.dumps(rec, indent=1))
    if rc != 0:
        print(f"[fail] rc={rc}: see {out / 'stdout.log'}", flush=True)
    return rec


def make_subset(data: Path, dest: Path, per_class: tuple[int, int],
                splits: tuple[str, str] = ("train", "test")) -> Path:
    """Smoke data: a folder of symlinks to the first n images per class of each split (no copies)."""
    for split, n in zip(splits, per_class):
        for cls in sorted(p for p in (data / split).iterdir() if p.is_dir()):
            d = dest / split / cls.name
            d.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                if not (d / f.name).exists():
                    (d / f.name).symlink_to(f.resolve())
    return dest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 in ImageNet layout (train/, test/)")
    p.add_argument("--budget", choices=list(BUDGETS), default="smoke")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--runs", type=Path, default=ROOT / "runs/reproduce", help="outputs: RUNS/BUDGET/...")
    p.add_argument("--figures", type=Path, default=ROOT / "docs/figures", help="PNG folder")
    p.add_argument("--results", type=Path, default=ROOT / "docs/results.md")
    p.add_argument("--ablations", help="comma list (default: the budget's)")
    p.add_argument("--ks", help="comma list of labels/class for semisup (default: the budget's)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every pretraining run")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        p.error(f"unknown stage(s) {bad}; valid: {STAGES}")
    b = BUDGETS[args.budget]
    base = args.runs / args.budget
    data = Path(args.data).resolve()
    if not (data / "train").is_dir():
        p.error(f"--data {data}: no train/ folder (expected ImageNet layout train/CLASS/IMG)")
    if b["subset"]:
        data = make_subset(data, base / "data", b["subset"])
    py = sys.executable
    common = [f"data.root={data}"]

    def pretrain(name: str, extra: list[str]) -> Path:
        out = base / name
        epochs_override = []
        if "data.rotation_mode=one_random" in extra:
            # one_random feeds K*N originals (one rotation each) per step: K times fewer steps per
            # epoch, so K times the epochs (and milestones) keeps steps and samples per step equal.
            from rotnet.config import load_config
            cfg = load_config(ROOT / b["config"], [*b["train"], *args.overrides, *extra])
            k = len(cfg.data.rotations)
            sched = [[e * k, lr] for e, lr in cfg.optim.schedule]
            epochs_override = [f"optim.epochs={cfg.optim.epochs * k}", f"optim.schedule={json.dumps(sched)}"]
        step(out, [py, "train.py", "--config", b["config"], *common, *b["train"], *args.overrides, *extra,
                   *epochs_override, f"train.output_dir={out / 'pretrain'}"], args.dry_run)
        return out / "pretrain"

    def evaluate(ckpt_dir: Path, head: str, epochs: int, dest: Path, extra: list[str]) -> None:
        # eval.py stretches probe.schedule from probe.epochs to --epochs, so the 50-epoch MLP table
        # must come with probe.epochs=50 (else its milestones would not move: constant lr).
        sched = [MLP_SCHEDULE, f"probe.epochs={MLP_EPOCHS}"] if head == "mlp" else []
        step(dest, [py, "eval.py", "--checkpoint", str(ckpt_dir / "checkpoint.pt"), "--layer", "all",
                    "--head", head, "--epochs", str(epochs), "--output-dir", str(dest), *extra,
                    *common, *sched], args.dry_run)

    main_dir = base / "main" / "pretrain"
    if "pretrain" in stages:
        pretrain("main", [])
    if "eval" in stages:
        for head, epochs in b["eval"].items():
            evaluate(main_dir, head, epochs, base / "main" / f"eval_{head}", ["--with-random"])
    if "ablations" in stages:
        names = args.ablations.split(",") if args.ablations else b["ablations"]
        if not b["ablation_train"]:   # same budget as the main run: the main run is the rot_4 row
            names = [n for n in names if n != "rot_4"]
        unknown = sorted(set(names) - set(ABLATIONS))
        if unknown:
            p.error(f"unknown ablation(s) {unknown}; valid: {list(ABLATIONS)}")
        for name in names:
            d = pretrain(f"ablation_{name}", [*b["ablation_train"], *ABLATIONS[name]])
            head, epochs = next(iter(b["eval"].items()))
            evaluate(d, head, epochs, base / f"ablation_{name}" / f"eval_{head}", [])
    if "semisup" in stages:
        ks = [int(k) for k in args.ks.split(",")] if args.ks else b["semisup_ks"]
        for k in ks:
            epochs = max(1, round(b["semisup_samples"] / (10 * k)))
            probe = ["--layer", "block2", "--head", "conv", "--labels-per-class", str(k),
                     "--epochs", str(epochs)]
            step(base / "semisup" / f"rotnet_k{k}",
                 [py, "eval.py", "--checkpoint", str(main_dir / "checkpoint.pt"), *probe,
                  "--output-dir", str(base / "semisup" / f"rotnet_k{k}"), *common], args.dry_run)
            step(base / "semisup" / f"scratch_k{k}",
                 [py, "eval.py", "--checkpoint", "random", "--config", str(main_dir / "config.yaml"), *probe,
                  "--finetune", "--output-dir", str(base / "semisup" / f"scratch_k{k}"), *common],
                 args.dry_run)
    if "figures" in stages and not args.dry_run:
        from benchmarks.reproduce_report import plot_semisup
        prefix = args.figures / f"cifar10_{args.budget}"
        evals = [str(e) for e in sorted((base / "main").glob("eval_*/eval.json"))]
        (base / "figures" / "step.json").unlink(missing_ok=True)   # figures always redrawn
        step(base / "figures", [py, "visualize.py", "--run", str(main_dir), "--data-root", str(data),
                                "--eval-json", *evals, "--out", str(prefix),
                                "--title", f"({args.budget})"], False)
        plot_semisup(base / "semisup", Path(f"{prefix}_semisup.png"), args.budget)
    if not args.dry_run:
        write_results(args.runs, args.results, args.figures, ROOT)
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
