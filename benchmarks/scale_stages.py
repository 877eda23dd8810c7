"""The stages of benchmarks/scale.py, each run alone in a fresh process on an ImageNet-shaped tree.

    python benchmarks/scale_stages.py STAGE TREE SETTINGS_JSON      (benchmarks/scale.py runs this)

Every stage returns a dict of figures (seconds, bytes, MB of resident memory); the process
prints it as its last line of output, as JSON. Resident memory is read from /proc (`rss_mb`),
so figures are the process's own; the runner adds the peak of the whole process tree. Memory
with the DataLoader workers (`tree_memory_mb`) is anonymous memory, each page once (the figure
the leak check judges), with USS and PSS beside it: PSS splits shared library pages across every
process mapping them, so other jobs on the machine move it.
A stage's name may carry its variant after a colon: "loader:dali:64" = DALI loader, rank 0 of 64.
"""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time


def process_start(pid: str = "self") -> float:
    """When the kernel started process `pid` (time.time() scale): /proc/PID/stat's starttime
    (field 22, clock ticks since boot) against the boot-time clock now. /proc/stat's btime would
    do too, but it is whole seconds; this is good to a clock tick (10 ms)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()   # after the command name, which may hold spaces
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")   # field 22; fields[0] is field 3
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)


T_START = process_start()   # "from process start": the interpreter's own start-up and imports included

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from pipelines import build_rotation_loader  # noqa: E402
from pipelines.batch import rank_indices  # noqa: E402
from pipelines.listing import list_images, write_file_list  # noqa: E402
from rotnet.config import load_config  # noqa: E402
from rotnet.distributed import DistInfo  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "imagenet_alexnet.yaml")
PROBE_ARCHS = ("alexnet", "resnet50")


def rss_mb() -> float:
    """Resident memory of this process now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def config(tree: str, s: dict, backend: str, extra: tuple[str, ...] = ()):
    """The ImageNet AlexNet config on `tree`, loaded the way `settings` says (batch, threads)."""
    return load_config(CONFIG, [f"data.root={tree}", f"loader.backend={backend}",
                                f"loader.num_threads={s['threads']}", *extra])


# ---------------------------------------------------------------------------- stages

def stage_empty(tree: str, s: dict) -> dict:
    """The same imports as every other stage, nothing else: the baseline of 'memory above empty'."""
    return {"rss_mb": rss_mb()}


def stage_listing(tree: str, s: dict) -> dict:
    """What every loader does first: the layout check, class folders, sorted paths and labels."""
    before = rss_mb()
    t0 = time.perf_counter()
    paths, labels, classes = list_images(os.path.join(tree, "train"), labelled=False)
    train_s = time.perf_counter() - t0
    held = rss_mb() - before
    t0 = time.perf_counter()
    val = list_images(os.path.join(tree, "val"), labelled=False)[0]
    return {"train_files": len(paths), "classes": len(classes), "train_s": train_s,
            "val_files": len(val), "val_s": time.perf_counter() - t0, "listing_mb": held,
            "path_str_mb": sum(sys.getsizeof(p) for p in paths) / 2**20}


def stage_scan(tree: str, s: dict) -> dict:
    """`pipelines.scan`'s full-decode check on a seeded sample, one core (DALI's CPU decoder on one
    thread where DALI is installed, as the scan does; else the torch backends'): images/s per core."""
    from pipelines.recipe import image_problem
    from pipelines.scan import dali_available, dali_reasons

    paths = list_images(os.path.join(tree, "train"), labelled=False)[0]
    sample = random.Random(0).sample(paths, min(s["scan_sample"], len(paths)))
    torch.set_num_threads(1)
    dali = dali_available()
    t0 = time.perf_counter()
    bad = sum(map(bool, dali_reasons(sample, workers=1) if dali else [image_problem(p) for p in sample]))
    rate = len(sample) / (time.perf_counter() - t0)
    return {"decoder": "dali" if dali else "torch", "images": len(sample), "bad": bad, "per_core_img_s": rate,
            "imagenet_16_cores_min": 1_281_167 / (rate * 16) / 60}


def stage_loader(tree: str, s: dict, backend: str, world: str) -> dict:
    """A rotation loader built as rank 0 of `world`, up to its first batch; memory it holds."""
    cfg = config(tree, s, backend)
    before = rss_mb()
    t0 = time.perf_counter()
    loader = build_rotation_loader(cfg, os.path.join(tree, "train"), batch_size=s["batch"],
                                   train=True, seed=0, info=DistInfo(world_size=int(world)))
    build_s = time.perf_counter() - t0
    built = rss_mb() - before
    images, _ = next(iter(loader))
    return {"build_s": build_s, "first_batch_s": time.perf_counter() - t0, "steps": len(loader),
            "built_mb": built, "loader_mb": rss_mb() - before, "batch_shape": list(images.shape),
            **{f"with_workers_{k}_mb": v for k, v in tree_memory_mb().items()}}


def stage_epoch(tree: str, s: dict) -> dict:
    """One rank's share of an epoch's shuffle with 64 ranks (each rank draws the permutation)."""
    n = len(list_images(os.path.join(tree, "train"), labelled=False)[0])
    t0 = time.perf_counter()
    for epoch in range(5):
        idx = rank_indices(n, s["batch"], 0, 64, True, 0, epoch)
    return {"files": n, "per_rank_s": (time.perf_counter() - t0) / 5, "indices_per_rank": len(idx)}


def stage_state(tree: str, s: dict, backend: str) -> dict:
    """The loader state one rank puts in a checkpoint (rank 0 of 64, after a batch); saving and
    loading a checkpoint holding 64 such states."""
    from rotnet.checkpoint import atomic_save

    cfg = config(tree, s, backend)
    loader = build_rotation_loader(cfg, os.path.join(tree, "train"), batch_size=s["batch"],
                                   train=True, seed=0, info=DistInfo(world_size=64))
    next(iter(loader))
    state = loader.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        t0 = time.perf_counter()
        atomic_save({"loader": [dict(state, rank=r) for r in range(64)]}, path)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        states = torch.load(path, weights_only=True)["loader"]
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loader.load_state_dict(states[0])
        restore_s = time.perf_counter() - t0
    return {"state_bytes": buf.tell(), "save_64_s": save_s, "load_64_s": load_s, "restore_s": restore_s}


def seeded_subset(train: str, n: int, tmp: str) -> tuple[str, list[int]]:
    """(file list of a seeded n-image subset of `train`, written into tmp; the kept indices)."""
    paths, labels, _ = list_images(train, labelled=False)
    keep = sorted(random.Random(0).sample(range(len(paths)), min(n, len(paths))))
    file_list = os.path.join(tmp, "subset.txt")
    write_file_list(file_list, [os.path.relpath(paths[i], train) for i in keep], [labels[i] for i in keep])
    return file_list, keep


def stage_shards(tree: str, s: dict) -> dict:
    """`pipelines.pack_shards` on a seeded sample, cut into ImageNet's ~257 shards; listing them."""
    from pipelines.listing import list_shards
    from pipelines.pack_shards import pack

    train = os.path.join(tree, "train")
    with tempfile.TemporaryDirectory(dir=s["work"]) as tmp:
        file_list, keep = seeded_subset(train, s["pack_images"], tmp)
        t0 = time.perf_counter()
        pack(train, os.path.join(tmp, "shards"), shard_size=-(-len(keep) // 257), workers=1,
             file_list=file_list)
        pack_s = time.perf_counter() - t0
        mb = sum(e.stat().st_size for e in os.scandir(os.path.join(tmp, "shards"))) / 2**20
        t0 = time.perf_counter()
        listed = list_shards(os.path.join(tmp, "shards"))
        list_s = time.perf_counter() - t0
        tars = sum(1 for e in os.scandir(os.path.join(tmp, "shards")) if e.name.endswith(".tar"))
    return {"images": len(keep), "shards": tars, "listed": len(listed[0]), "pack_mb_s": mb / pack_s,
            "pack_s": pack_s, "list_s": list_s}


def stage_val(tree: str, s: dict) -> dict:
    """`python -m pipelines.imagenet_val` on the flat val/ (symlink mode), as a user runs it."""
    with tempfile.TemporaryDirectory(dir=s["work"]) as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipelines.imagenet_val", os.path.join(tree, "val"),
                        "--labels", os.path.join(tree, "LOC_val_solution.csv"), "--train-dir",
                        os.path.join(tree, "train"), "--out", os.path.join(tmp, "val")], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        linked = sum(len(files) for _, _, files in os.walk(os.path.join(tmp, "val")))
    return {"seconds": seconds, "linked": linked}


def stage_knn(tree: str, s: dict) -> dict:
    """Bank memory per rank for a 1.28M bank (probes.knn.bank_bytes: fp16 rows of every probe point),
    gathered on every rank vs sharded over 64; and a measured vote of chunked queries on a synthetic
    bank, through the same knn_scores that eval.py uses."""
    from models import build_model
    from probes.knn import bank_bytes, knn_scores
    from probes.protocol import KnnProtocol
    from rotnet.config import Config, override

    n = 1_281_167
    out: dict = {}
    for arch in PROBE_ARCHS:
        cfg = override(Config(), {"model.arch": arch, "data.crop_size": 224})
        trunk = build_model(cfg, 0).trunk.eval()
        for pool in ("avg", "grid"):
            for world, key in ((1, "gathered"), (64, "sharded64")):
                out[f"{arch}_{pool}_{key}_gb"] = bank_bytes(trunk, trunk.layer_names, pool, n, world,
                                                            torch.float16) / 1e9
    rows = int(n * s["knn_fraction"])
    bank = torch.nn.functional.normalize(torch.randn(rows, 256), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(s["knn_queries"], 256), dim=1)
    labels = torch.randint(0, 1000, (rows,))
    p = KnnProtocol(head="knn", layers=[], batch_size=1, precision="fp32", seed=0, labels_per_class=0,
                    info=DistInfo(), cfg=Config(), k=20, t=0.07, pool="avg")
    before = rss_mb()
    t0 = time.perf_counter()
    knn_scores(queries, bank, labels, 1000, p, chunk=64)
    out.update(vote_rows=rows, vote_queries=len(queries), vote_ms_per_query=(time.perf_counter() - t0) * 1e3
               / len(queries), vote_extra_mb=rss_mb() - before)
    return out


def stage_train(tree: str, s: dict, backend: str) -> dict:
    """train.py on the tree, in this process: process start to the first optimizer step, with the
    loader build inside it, then a few more steps (train.max_steps)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import pipelines
    import train

    steps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: steps.append(time.time()))
    built: list[float] = []
    build = pipelines.build_rotation_loader   # what train.build_run's loaders are built with

    def timed_build(*args, **kwargs):
        t0 = time.time()
        loader = build(*args, **kwargs)
        built.append(time.time() - t0)
        return loader

    pipelines.build_rotation_loader = timed_build
    with tempfile.TemporaryDirectory(dir=s["work"]) as tmp:
        train.main(["--config", CONFIG, f"data.root={tree}", f"loader.backend={backend}",
                    f"loader.num_threads={s['threads']}", f"optim.global_batch_size={s['batch']}",
                    f"train.max_steps={s['train_steps']}", "train.log_every=1", f"train.output_dir={tmp}",
                    "train.precision=fp32"])
    return {"to_first_step_s": steps[0] - T_START, "loader_build_s": built[0],
            "val_loader_build_s": sum(built[1:]),
            "step_s": (steps[-1] - steps[0]) / max(1, len(steps) - 1), "steps": len(steps)}


def stage_leak(tree: str, s: dict, backend: str) -> dict:
    """Memory of the process and its workers (`tree_memory_mb`) after each of `leak_epochs` epochs
    over a seeded `leak_images` subset; judged: growth of anonymous memory from epoch 2 to the last."""
    train = os.path.join(tree, "train")
    with tempfile.TemporaryDirectory(dir=s["work"]) as tmp:
        file_list, _ = seeded_subset(train, s["leak_images"], tmp)   # the loader lists the subset itself
        cfg = config(tree, s, backend, (f"data.file_list={file_list}",))
        loader = build_rotation_loader(cfg, train, batch_size=s["batch"], train=True, seed=0)
        mem = []
        for epoch in range(s["leak_epochs"]):
            loader.set_epoch(epoch)
            for _ in loader:
                pass
            mem.append(tree_memory_mb())
    growth = {k: mem[-1][k] / mem[1][k] - 1 if len(mem) > 1 else 0.0 for k in mem[0]}
    return {"growth_2_to_last": growth["anon"], "uss_growth_2_to_last": growth["uss"],
            "pss_growth_2_to_last": growth["pss"], "anon_mb_per_epoch": [m["anon"] for m in mem],
            "pss_mb_per_epoch": [m["pss"] for m in mem]}


def tree_memory_mb(pid: str = "self") -> dict[str, float]:
    """Memory of process `pid` plus its children (DataLoader workers), MB, from
    /proc/PID/smaps_rollup, summed over the processes:
      anon  anonymous memory, each page once (Pss_Anon): the heap, tensors, copy-on-write copies.
            Pages can only be shared with the process's own forks, so the sum counts them once,
            and no other job on the machine moves it. The leak check judges this figure.
      uss   private memory (Private_Clean + Private_Dirty): pages no other process maps. A parent's
            pages still shared with its workers are in nobody's USS, so the sum undercounts.
      pss   proportional set size: also splits shared library pages with every other process
            mapping them (other torch jobs), so it moves with the machine; for information."""
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += f.read().split()
        except OSError:
            continue
    kb = dict.fromkeys(("Private_Clean:", "Private_Dirty:", "Pss:", "Pss_Anon:", "Anonymous:"), 0)
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    key, value, *_ = line.split()
                    if key in kb:
                        kb[key] += int(value)
        except OSError:
            pass    # a worker that just ended
    anon = kb["Pss_Anon:"] or kb["Anonymous:"]   # kernels before 5.8 have no Pss_Anon: forks' pages twice
    return {"anon": anon / 1024, "uss": (kb["Private_Clean:"] + kb["Private_Dirty:"]) / 1024,
            "pss": kb["Pss:"] / 1024}


STAGES = {"empty": stage_empty, "listing": stage_listing, "scan": stage_scan, "loader": stage_loader,
          "epoch": stage_epoch, "state": stage_state, "shards": stage_shards, "val": stage_val,
          "knn": stage_knn, "train": stage_train, "leak": stage_leak}


def main(argv: list[str]) -> int:
    name, tree, settings = argv
    kind, *variant = name.split(":")
    figures = STAGES[kind](tree, json.loads(settings), *variant)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
