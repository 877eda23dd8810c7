#!/usr/bin/env python
"""What does probing every layer cost compared with probing one? (eval.py's one-pass design)

Two measurements on the same config (default configs/sample.yaml, built-in sample data):
  end to end   `python eval.py --checkpoint random --layer conv4` vs `--layer all`, a few
               epochs each, in subprocesses: wall time and mean train-epoch time from
               eval_log.jsonl (data loading included, as a user sees it).
  compute      one probe training step (frozen forward + probe forward/backward + SGD)
               on a synthetic batch, no data loading: single layer, all layers in one
               pass, and the naive alternative of one trunk pass per layer.
Weights do not change the cost, so a random-init trunk stands in for a checkpoint.
Figures are printed and appended (with machine, commit and date) to docs/benchmarks.md.

    python benchmarks/eval_onepass.py [--config CFG] [--epochs 3] [--single conv4] [key.sub=value ...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.report import append_block, machine  # noqa: E402
from models import build_model  # noqa: E402
from probes.engine import build_probe_set  # noqa: E402
from probes.heads import valid_layers  # noqa: E402
from probes.protocol import ProbeProtocol  # noqa: E402
from rotnet.checkpoint import git_commit  # noqa: E402
from rotnet.config import load_config  # noqa: E402
from rotnet.distributed import DistInfo, place  # noqa: E402
from rotnet.schedule import build_optimizer  # noqa: E402

HEADING = "## eval.py: one frozen pass for all probe layers (benchmarks/eval_onepass.py)"
INTRO = "Target: `--layer all` costs at most 1.5x `--layer conv4`."


def end_to_end(args, layer: str, out: Path) -> dict:
    """Run eval.py in a subprocess; wall seconds and mean train-epoch seconds (first epoch dropped)."""
    cmd = [sys.executable, "eval.py", "--config", args.config, "--checkpoint", "random", "--layer", layer,
           "--epochs", str(args.epochs), "--head", args.head, "--output-dir", str(out), *args.overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "ROTNET_PROGRESS": "0"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"eval.py failed:\n{proc.stderr[-3000:]}")
    epochs = [json.loads(line)["time_s"] for line in (out / "eval_log.jsonl").read_text().splitlines()]
    steady = epochs[1:] or epochs
    return {"wall_s": wall, "epoch_s": statistics.mean(steady), "cmd": " ".join(cmd[1:])}


def compute_step(cfg, head: str, layers: list[str], batch: int, steps: int, device: torch.device) -> float:
    """Median seconds of one training step of probes on `layers` (one trunk pass), synthetic input.

    Probes, memory format and optimizer come from eval.py's own builders (probes.engine)."""
    p = ProbeProtocol(head=head, layers=layers, epochs=1, schedule=cfg.probe.schedule, batch_size=batch,
                 precision="bf16", finetune=False, seed=0, labels_per_class=0, info=DistInfo(device=device),
                 cfg=cfg, val_every=0, out=REPO)
    raw = build_probe_set(p, build_model(cfg, 0).trunk, "benchmark", 10)
    model = place(raw, p.info, cfg.train.channels_last)
    opt = build_optimizer(raw.trainable_parameters(), cfg.probe.schedule[0][1], cfg.probe)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, cfg.data.crop_size, cfg.data.crop_size, device=device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(x)
        loss = sum(torch.nn.functional.cross_entropy(v, y) for v in logits.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sample.yaml")
    ap.add_argument("--epochs", type=int, default=3,
                    help="epochs per end-to-end run (first is dropped as warm-up)")
    ap.add_argument("--single", default="conv4", help="the single layer to compare 'all' with")
    ap.add_argument("--head", default="linear")
    ap.add_argument("--steps", type=int, default=10, help="timed compute steps per case")
    ap.add_argument("--no-e2e", action="store_true", help="compute measurement only")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads here and in the eval.py runs (0: torch's default). On a "
                         "CPU shared with other jobs use 1: every multi-threaded op otherwise waits for a "
                         "descheduled thread (~10 ms), and the op count, not the work, sets the time.")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the eval.py subprocesses
    cfg = load_config(REPO / args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_layers = valid_layers(args.head, build_model(cfg, 0).trunk)
    batch = cfg.probe.batch_size_per_gpu

    rows = []
    single = compute_step(cfg, args.head, [args.single], batch, args.steps, device)
    every = compute_step(cfg, args.head, all_layers, batch, args.steps, device)
    naive = sum(compute_step(cfg, args.head, [k], batch, args.steps, device) for k in all_layers)
    rows.append(f"| compute step, batch {batch} (synthetic, no data loading) | {single * 1e3:.1f} ms | "
                f"{every * 1e3:.1f} ms | **{every / single:.2f}x** | "
                f"one pass per layer: {naive * 1e3:.1f} ms ({naive / single:.2f}x) |")
    if not args.no_e2e:
        with tempfile.TemporaryDirectory() as tmp:
            a = end_to_end(args, args.single, Path(tmp) / "single")
            b = end_to_end(args, "all", Path(tmp) / "all")
        rows.append(f"| eval.py train epoch ({args.epochs} epochs, first dropped) | {a['epoch_s']:.2f} s | "
                    f"{b['epoch_s']:.2f} s | **{b['epoch_s'] / a['epoch_s']:.2f}x** | |")
        rows.append(f"| eval.py whole run, wall (startup + val included) | {a['wall_s']:.1f} s | "
                    f"{b['wall_s']:.1f} s | **{b['wall_s'] / a['wall_s']:.2f}x** | |")

    # A copy of the tree without .git (e.g. a rented GPU box) cannot tell its commit: ROTNET_COMMIT can.
    commit = git_commit() if git_commit() != "unknown" else os.environ.get("ROTNET_COMMIT", "unknown")
    load = (f", load average {os.getloadavg()[0]:.1f} at the end (shared cores: compare rows of one block)"
            if hasattr(os, "getloadavg") else "")
    block = "\n".join([
        f"### {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} | commit {commit} | {machine()}{load}",
        "",
        f"`python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`: {cfg.model.arch} width "
        f"{cfg.model.width}, {cfg.data.crop_size} px, data {cfg.data.root or 'built-in sample set'}, "
        f"{args.head} probes, bf16 autocast, device {device.type}.",
        "",
        f"| measurement | `--layer {args.single}` | `--layer all` ({', '.join(all_layers)}) "
        "| all / single | note |",
        "|---|---:|---:|---:|---|",
        *rows, ""])
    print(block)
    path = REPO / "docs" / "benchmarks.md"
    append_block(path, block, heading=HEADING, intro=INTRO)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
