r"""Training throughput: steps/s and original images/s, real input pipeline vs synthetic input.

    python benchmarks/train_throughput.py                                  # CPU: sample (+ cifar with data)
    python benchmarks/train_throughput.py --cifar-data ../shared/datasets/cifar10-jpeg
    python benchmarks/train_throughput.py --device cuda --cifar-data DIR --imagenet-data DIR
    python benchmarks/train_throughput.py --case cifar=configs/cifar10_nin_cpu.yaml \
        optim.batch_size_per_gpu=64

Each case is a config trained for --warmup + --steps steps with train.py's own run and step
(`train.build_run`: model, channels_last, compile, fused SGD, scaled lr; then
`train.train_one_epoch`: prepare_batch, autocast, SGD, the per-window device sync), twice:
  real       batches from pipelines.build_rotation_loader (decode, crop, rotations: the pipeline)
  synthetic  one batch of the pipeline's output kept on the device and replayed (no input cost)
so `1 - real/synthetic` is what the input pipeline costs the trainer. Without data for a case
only the synthetic row is measured (random tensors of the pipeline's output format).

Cases (`CASES`): sample (built-in data) and cifar (real input with --cifar-data) everywhere; with
--device cuda also alexnet224 and resnet50_224 (real input with --imagenet-data, an ImageNet-layout
folder with train/, e.g. Imagenette). --case NAME=CONFIG replaces or adds one; --only picks some.
Trailing key=value overrides apply to every case.
The table is printed and appended to docs/benchmarks.md under this script's heading.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402  (train.py: the step being measured)
from benchmarks.report import append_block, machine  # noqa: E402
from pipelines import build_rotation_loader  # noqa: E402
from pipelines.batch import normalize_in_graph, rotation_labels  # noqa: E402
from rotnet.checkpoint import git_commit  # noqa: E402
from rotnet.config import load_config, override  # noqa: E402
from rotnet.distributed import DistInfo  # noqa: E402
from train import Run, build_run, resolve  # noqa: E402

HEADING = "## Training throughput (benchmarks/train_throughput.py)"
# name: (config on cuda, config on cpu (None: cuda only), the --*-data flag that gives its root (None:
# built-in sample data)). On CPU the paper's CIFAR NIN (width 1, batch 128) takes ~20 s a step on 2
# shared cores: the CPU-budget variant of the same protocol runs there (width 0.5, batch 64).
CASES = {
    "sample": ("configs/sample.yaml", "configs/sample.yaml", None),
    "cifar": ("configs/cifar10_nin.yaml", "configs/cifar10_nin_cpu.yaml", "cifar_data"),
    "alexnet224": ("configs/imagenet_alexnet.yaml", None, "imagenet_data"),
    "resnet50_224": ("configs/imagenet_resnet50.yaml", None, "imagenet_data"),
}


class TimingLogger:
    """Stands in for rotnet.progress.RunLogger: train_one_epoch's meter calls step() right after
    its once-per-window device sync, so the timestamps are exact step boundaries."""

    def __init__(self):
        self.marks: list[tuple[int, float, float]] = []   # (global step, time, data_wait share)

    def start_epoch(self, epoch, total, initial=0):
        pass

    def step(self, global_step, n_steps, scalars):
        self.marks.append((global_step, time.perf_counter(), scalars.get("data_wait", float("nan"))))

    def close(self, finished=True):   # RunLogger's interface (train.py closes the logger at a run's end)
        pass


class ReplayLoader(list):
    """The synthetic input: a list of one batch already on the device, repeated."""

    def set_epoch(self, epoch):
        pass

    def state_dict(self):
        return {}


def synthetic_batch(cfg, device: torch.device):
    """Random tensors in the loader's output format (see the contract in pipelines/batch.py): a graph
    that normalises emits float16 (K*N, 3, S, S) in channels-last memory, so the same input path
    (prepare_batch, autocast's first cast) is timed; else uint8 (K*N, S, S, 3)."""
    n, k, s = cfg.optim.batch_size_per_gpu, len(cfg.data.rotations), cfg.data.crop_size
    labels = rotation_labels(k, n, device=device)
    if normalize_in_graph(cfg.loader.normalize, device):
        return torch.randn(k * n, s, s, 3, dtype=torch.float16, device=device).permute(0, 3, 1, 2), labels
    return torch.randint(0, 256, (k * n, s, s, 3), dtype=torch.uint8, device=device), labels


def measure(run: Run, loader, warmup: int, steps: int, first_epoch: int = 0) -> dict:
    """Steps/s over `steps` steps after `warmup`, through train.train_one_epoch; epochs follow one
    another (set_epoch, a new iterator: a real cost of small data sets) until enough steps ran."""
    total = warmup + steps
    log_every = max(1, min(warmup, len(loader)))
    run.cfg = override(run.cfg, {"train.max_steps": total, "train.log_every": log_every})
    run.step, run.logger = 0, TimingLogger()
    epoch = first_epoch
    while run.step < total:
        loader.set_epoch(epoch)
        train.train_one_epoch(run, loader, epoch=epoch, start_step=0)
        epoch += 1
    marks = run.logger.marks
    (s0, t0, _), (s1, t1, _) = next(m for m in marks if m[0] >= warmup), marks[-1]
    waits = [w for s, _, w in marks if s > s0 and not math.isnan(w)]
    return {"steps_per_s": (s1 - s0) / (t1 - t0),
            "data_wait": sum(waits) / len(waits) if waits else float("nan"), "next_epoch": epoch}


def run_case(name: str, config: str, root: str | None, args) -> list[dict]:
    cfg = load_config(REPO / config, args.overrides)
    if root is not None:
        cfg = override(cfg, {"data.root": root})
    device = torch.device(args.device)
    info = DistInfo(device=device)
    cfg = resolve(cfg, info)   # as train.py resolves it; data.root "" = the built-in sample data
    root = None if cfg.data.root == "REQUIRED" else cfg.data.root
    run = build_run(cfg, info, TimingLogger(), loaders=False)   # what train.py builds, but its loaders
    # build_run arms train.py's graceful stop (SIGTERM/SIGUSR1 -> checkpoint into train.output_dir).
    # A benchmark has nothing to save and must not write into a real run's folder: die at once.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    print(f"[{name}] built: {cfg.model.arch} x{cfg.model.width:g}, "
          f"timing {args.warmup}+{args.steps} steps per row", file=sys.stderr, flush=True)
    n, k = cfg.optim.batch_size_per_gpu, len(cfg.data.rotations)
    base = {"case": name, "config": config, "model": f"{cfg.model.arch} x{cfg.model.width:g}",
            "crop": cfg.data.crop_size, "batch": n, "k": k, "precision": cfg.train.precision}
    loader, batch, build_s = None, None, float("nan")
    if root and (Path(root) / cfg.data.train_dir).is_dir():
        t = time.perf_counter()
        loader = build_rotation_loader(cfg, str(Path(root) / cfg.data.train_dir), batch_size=n,
                                       info=DistInfo(device=device), train=True, seed=0)
        build_s = time.perf_counter() - t
        images, labels = next(iter(loader))
        batch = (images.clone(), labels.clone())   # loader buffers may be reused
    replay = ReplayLoader([batch or synthetic_batch(cfg, device)] * (args.warmup + args.steps))
    # Real and synthetic alternate (ABAB...) and each keeps its best repeat: on shared cores the
    # load changes within a minute, and the fastest repeat is the one least disturbed.
    real, synth = [], []
    epoch = 1                                       # epoch 0 gave the replayed batch
    for rep in range(args.repeats):
        if loader is not None:
            real.append(measure(run, loader, args.warmup, args.steps, first_epoch=epoch))
            epoch = real[-1]["next_epoch"]
        synth.append(measure(run, replay, args.warmup, args.steps))
    best = lambda rs: max(rs, key=lambda r: r["steps_per_s"])  # noqa: E731
    if loader is not None:
        row = {**base, "input": f"real ({loader.backend}, {cfg.loader.num_threads} threads)", "data": root,
               "build_s": build_s, **best(real)}
    else:
        row = {**base, "input": "real: no data", "data": root or "-", "steps_per_s": float("nan"),
               "data_wait": float("nan"), "build_s": build_s}
    return [row, {**base, "input": "synthetic (in memory)", "data": "-", "build_s": float("nan"),
                  **best(synth)}]


# ---------------------------------------------------------------------------- report

def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    out = ["| case | model | crop | batch (orig) | precision | input | steps/s | orig img/s | rotated img/s "
           "| data wait | input cost | loader build s |",
           "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    synth = {r["case"]: r["steps_per_s"] for r in rows if r["input"].startswith("synthetic")}
    for r in rows:
        sps = r["steps_per_s"]
        cost = 1 - sps / synth[r["case"]] if r["input"].startswith("real (") else float("nan")
        out.append(f"| {r['case']} | {r['model']} | {r['crop']} | {r['batch']} | {r['precision']} "
                   f"| {r['input']} | {f(sps, '.2f')} | {f(sps * r['batch'], '.0f')} "
                   f"| {f(sps * r['batch'] * r['k'], '.0f')} | {f(r['data_wait'], '.0%')} | {f(cost, '.0%')} "
                   f"| {f(r['build_s'], '.1f')} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10 cpu, 50 cuda)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 cpu, 10 cuda)")
    ap.add_argument("--cifar-data", default=None, help="CIFAR-10 in ImageNet layout (train/CLASS/*.jpg)")
    ap.add_argument("--imagenet-data", default=None, help="ImageNet-layout folder for the 224-px cases")
    ap.add_argument("--case", action="append", default=[], metavar="NAME=CONFIG",
                    help="add or replace a case")
    ap.add_argument("--only", default="", help="comma-separated case names to run")
    ap.add_argument("--repeats", type=int, default=2, help="alternating real/synthetic repeats, best kept")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"), help="'' to skip appending")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every case")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    args.steps = args.steps or (50 if cuda else 10)
    args.warmup = args.warmup or (10 if cuda else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = lambda flag: getattr(args, flag) if flag else None  # noqa: E731
    cases = {name: (gpu if cuda else cpu, root(flag))
             for name, (gpu, cpu, flag) in CASES.items() if cuda or cpu}
    for spec in args.case:
        name, _, config = spec.partition("=")
        cases[name] = (config, root(CASES.get(name, (None, None, None))[2]))
    if args.only:
        cases = {n: c for n, c in cases.items() if n in args.only.split(",")}

    rows = []
    for name, (config, root) in cases.items():
        print(f"[{name}] {config} data={root or 'config/built-in'}", file=sys.stderr, flush=True)
        rows += run_case(name, config, root, args)
    load = os.getloadavg()[0]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    datas = sorted({r["data"] for r in rows if r["data"] != "-"})
    block = (f"### {now} | commit {git_commit()} | {machine(torch.device(args.device))} | "
             f"load average {load:.1f} at the end (shared cores: compare rows of one block)\n\n"
             f"`{cmd.strip()}`: {args.warmup} warm-up + {args.steps} timed steps, "
             f"best of {args.repeats} alternating repeats per row, train.py's step (`train_one_epoch`), "
             f"device {args.device}, "
             f"{torch.get_num_threads()} intra-op threads; data: {', '.join(datas) or 'synthetic only'}.\n"
             "input cost = 1 - real/synthetic steps/s; data wait = the trainer's own share of time "
             "spent waiting for the loader.\n\n" + table(rows))
    print("\n" + block)
    if args.out:
        append_block(args.out, block, heading=HEADING)
        print(f"\nappended to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
