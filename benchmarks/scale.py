"""ImageNet's size without ImageNet: every per-file cost of rotnet at 1.28M files, one command.

    python benchmarks/scale.py --scale 1 --pool DIR [--compare 0.1] [--trees DIR] [--stages S,S]
                               [--json runs/scale/scale.json] [--no-write]

Builds the ImageNet-shaped trees it needs (benchmarks/imagenet_tree.py; kept for the next run),
then runs each stage of benchmarks/scale_stages.py in a fresh process, at --compare (default
1/10) and --scale, and records each process's wall time and peak resident memory (from wait4:
the largest of the process's and its children's own peaks, not their sum) beside the figures
the stage reports. The stages that do not depend on the tree's size (scan sample, kNN, the leak
check) run once, at --scale.
Writes the raw figures as JSON (--json) and the table (stage, both wall times, their ratio,
peak RSS, the stage's figures) under this script's heading in docs/benchmarks.md; a stage that
fails is recorded with its error and the others still run.
Wall times need quiet cores: under load they are several times too long; memory figures are not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import imagenet_tree  # noqa: E402
from benchmarks.report import append_block, machine  # noqa: E402
from rotnet.checkpoint import git_commit  # noqa: E402
from rotnet.cli import ArgumentParser, InputError, fail  # noqa: E402

STAGES_PY = os.path.join(REPO, "benchmarks", "scale_stages.py")
HEADING = "## ImageNet scale (benchmarks/scale.py)"
INTRO = ("Each block: one run of `python benchmarks/scale.py` on an ImageNet-shaped tree of hard links "
         "(benchmarks/imagenet_tree.py). Every stage is a fresh process; peak RSS is the largest of it and "
         "its children; `*_anon_mb` (anonymous memory, each page once: what the leak check judges), "
         "`*_uss_mb` and `*_pss_mb` figures add up a process and its DataLoader workers.")
SIZE_FREE = ("scan", "knn", "leak:dali", "leak:torch")   # run once: their work does not grow with the tree
STAGES = ("empty", "listing", "scan", "loader:torch:1", "loader:torch:64", "loader:dali:1", "loader:dali:64",
          "epoch", "state:torch", "state:dali", "shards", "val", "knn", "train:dali", "train:torch",
          "leak:dali", "leak:torch")


def run_stage(name: str, tree: str, settings: dict, timeout: float) -> dict:
    """One stage in a fresh process: its figures plus wall_s and peak_rss_mb (or its error)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, STAGES_PY, name, tree, json.dumps(settings)], cwd=REPO,
                                stdout=out, stderr=err, text=True)
        killed = False
        while True:   # wait4, not Popen.wait: it also returns the process tree's peak memory
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not killed and time.perf_counter() - t0 > timeout:
                proc.kill()
                killed = True
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        lines, errors = out.read().splitlines(), err.read().strip().splitlines()
    record = {"stage": name, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}
    if proc.returncode != 0 or not lines:
        why = f"killed after {timeout:g} s (--stage-timeout)" if killed else f"exit code {proc.returncode}"
        record["error"] = (errors[-1] if errors and not killed else why)[:300]
        return record
    record.update(json.loads(lines[-1]))
    return record


def run_scale(scale: float, stages: list[str], args, settings: dict) -> list[dict]:
    tree = imagenet_tree.build(imagenet_tree.get_parser().parse_args(
        ["--scale", repr(scale), "--out", args.trees, "--pool", args.pool]))
    records = []
    for name in stages:
        rec = run_stage(name, tree, settings, args.stage_timeout)
        print(f"scale {scale:g} {name}: " + json.dumps(rec), flush=True)
        records.append(rec)
    return records


def figures_text(rec: dict) -> str:
    """The stage's own figures, short: 'train_s=12.3, listing_mb=210'."""
    if "error" in rec:
        return "error: " + rec["error"].replace("|", "/")
    skip = ("stage", "wall_s", "peak_rss_mb")
    show = [(k, v) for k, v in rec.items() if k not in skip]
    scalars = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in show
                        if not isinstance(v, list))
    series = "".join(f", {k}=[{', '.join(f'{x:.0f}' for x in v)}]" for k, v in show
                     if isinstance(v, list) and k.endswith("_per_epoch"))
    return scalars + series


def table(small: list[dict], large: list[dict], compare: float, scale: float) -> str:
    """Markdown rows, one per stage run at `scale`. The ratio compares the stage's work: wall time
    above the `empty` stage's (interpreter and imports), which would otherwise flatten it."""
    before = {r["stage"]: r for r in small}
    base = [next((r["wall_s"] for r in recs if r["stage"] == "empty"), 0.0) for recs in (small, large)]
    rows = [f"| stage | wall s, scale {compare:g} | wall s, scale {scale:g} | ratio above empty | "
            f"peak RSS MB | figures at scale {scale:g} |", "|---|---|---|---|---|---|"]
    for rec in large:
        old = before.get(rec["stage"])
        ratio = "-"
        if old and rec["stage"] != "empty":
            ratio = f"{(rec['wall_s'] - base[1]) / max(old['wall_s'] - base[0], 1e-3):.1f}x"
        rows.append(f"| {rec['stage']} | {old['wall_s']:.1f} | " if old else f"| {rec['stage']} | - | ")
        rows[-1] += f"{rec['wall_s']:.1f} | {ratio} | {rec['peak_rss_mb']:.0f} | {figures_text(rec)} |"
    return "\n".join(rows)


def get_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--scale", type=imagenet_tree.parse_scale, default=1.0,
                    help="tree size for the figures: 1 = ImageNet's 1,281,167 + 50,000 files")
    ap.add_argument("--compare", type=imagenet_tree.parse_scale, default=0.1,
                    help="smaller tree run first, for the growth ratio (target: <= 12x from 1/10 to 1)")
    ap.add_argument("--trees", default=str(imagenet_tree.DEFAULT_TREES),
                    help="where the trees are built, outside the repository (default: imagenet_tree's --out)")
    ap.add_argument("--pool", required=True,
                    help="real JPEGs the tree links to, e.g. ../shared/datasets/imagenette-224/train "
                         "(see benchmarks/imagenet_tree.py)")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="comma-separated subset of: " + ", ".join(STAGES))
    ap.add_argument("--threads", type=int, default=2,
                    help="DALI threads / DataLoader workers: the cores you have")
    ap.add_argument("--batch", type=int, default=32, help="originals per step in the loader and train stages")
    ap.add_argument("--scan-sample", type=int, default=1000, help="images the decode check reads")
    ap.add_argument("--pack-images", type=int, default=5140, help="images packed into ~257 tar shards")
    ap.add_argument("--knn-queries", type=int, default=256, help="queries voted against the synthetic bank")
    ap.add_argument("--knn-fraction", type=float, default=1.0, help="bank rows as a fraction of 1.28M")
    ap.add_argument("--train-steps", type=int, default=3,
                    help="optimizer steps train.py runs (train.max_steps)")
    ap.add_argument("--leak-images", type=int, default=20000, help="subset each leak epoch reads")
    ap.add_argument("--leak-epochs", type=int, default=10, help="epochs of the leak check")
    ap.add_argument("--stage-timeout", type=float, default=1800, help="seconds before a stage is killed")
    ap.add_argument("--json", default=os.path.join(REPO, "runs", "scale", "scale.json"),
                    help="raw figures of every stage, both scales")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"), help="report to append to")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave --out alone")
    return ap


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        fail(f"--stages: unknown {', '.join(unknown)}; valid: {', '.join(STAGES)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    settings = {"threads": args.threads, "batch": args.batch, "scan_sample": args.scan_sample,
                "pack_images": args.pack_images, "knn_queries": args.knn_queries,
                "knn_fraction": args.knn_fraction, "train_steps": args.train_steps,
                "leak_images": args.leak_images, "leak_epochs": args.leak_epochs,
                "work": os.path.dirname(os.path.abspath(args.json))}
    t0 = time.perf_counter()
    try:
        small = (run_scale(args.compare, [s for s in stages if s not in SIZE_FREE], args, settings)
                 if args.compare != args.scale else [])
        large = run_scale(args.scale, stages, args, settings)
    except InputError as e:
        fail(e)
    total = time.perf_counter() - t0
    with open(args.json, "w") as f:
        json.dump({"machine": machine("cpu"), "commit": git_commit(), "settings": settings, "total_s": total,
                   f"scale {args.compare:g}": small, f"scale {args.scale:g}": large}, f, indent=1)
    text = (f"### {time.strftime('%Y-%m-%d')}, commit {git_commit()}: "
            f"scale {args.scale:g} vs {args.compare:g}\n\n"
            f"Machine: {machine('cpu')}. {args.threads} loader threads, batch {args.batch}; "
            f"whole run {total / 60:.1f} min, load average {os.getloadavg()[0]:.1f} at the end (wall times "
            f"need quiet cores). Raw figures: {os.path.relpath(args.json, REPO)}.\n\n"
            + table(small, large, args.compare, args.scale) + "\n")
    print(text)
    if not args.no_write:
        append_block(args.out, text, HEADING, INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
