"""train.py under several processes on CPU (gloo): DDP equivalence, two "nodes", a crashed rank.

Every run is a real `train.py` subprocess (torchrun or plain python) on tiny settings and a
tiny PNG data set made in tmp_path; weights are compared through the checkpoints.

Why the DDP equivalence test needs a special data set: 2 ranks x N images must equal 1 rank
x 2N images, but (a) BatchNorm normalises with per-rank batch statistics, and SyncBatchNorm
cannot help on CPU (torch raises "SyncBatchNorm expected input tensor to be on GPU"); (b) the
crops and flips are drawn per (rank, position), so the two runs crop differently. So:
  - images are square at crop size with min_scale=1 (the crop is the whole image) and
    symmetric under both flips (a flip changes nothing);
  - files are paired in the epoch's shuffle order so that rank 1's image at each position is
    rank 0's image rotated by 90 degrees. Each rank's batch then holds the SAME multiset of
    rotated inputs (4 rotations of X = 4 rotations of rot90 X), so per-rank BatchNorm
    statistics equal the global ones, while the LABELS differ between the ranks, so the two
    ranks' gradients differ and the all-reduce is really exercised.
The test checks these preconditions through the public loader API before training.
The helpers here are shared with tests/test_train_resume.py and tests/slurm/test_slurm.py.
"""
from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_run import train_in_process

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run"]
CROP = 64
# Tiny, deterministic, fast: fp32 (bit-exact on CPU), torch backend without workers, no held-out eval.
# lr 0.01, not the sample config's 0.05: at 0.05 this width-0.25 net is chaotic on tiny data (a
# 1e-7 rounding change, e.g. channels_last on/off, grows to 7e-3 in 3 steps), which would make
# any cross-run comparison meaningless; at 0.01 it stays at 1e-7.
TINY = ["model.width=0.25", f"data.crop_size={CROP}", f"data.resize_size={CROP}", "loader.backend=torch",
        "loader.num_threads=0", "train.precision=fp32", "train.eval_rotation_every=0", "train.log_every=1",
        "optim.schedule=[[0,0.01]]"]
# Paired data set: the crop is the whole (crop-sized) image.
WHOLE = ["data.min_scale=1.0"]


# ---------------------------------------------------------------------------- helpers

def run_env(**extra) -> dict:
    """CPU and gloo even on a GPU machine (these tests pin down CPU semantics: bit-exact fp32);
    one intra-op thread per process: 2 ranks on 2 shared cores must not oversubscribe."""
    env = dict(os.environ, OMP_NUM_THREADS="1", ROTNET_PROGRESS="0", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_args(out: Path, data_root: Path, *overrides: str) -> list[str]:
    return ["train.py", "--config", "configs/sample.yaml", f"train.output_dir={out}",
            f"data.root={data_root}", *TINY, *overrides]


def run(cmd: list[str], timeout: float = 150, check: bool = True, **env) -> subprocess.CompletedProcess:
    """Run in the repo root; on an unexpected exit code fail with the output's tail."""
    p = subprocess.run(cmd, cwd=REPO, env=run_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"exit {p.returncode}: {' '.join(map(str, cmd))}\n{tail(p.stdout + p.stderr)}")
    return p


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_ckpt(out: Path) -> dict:
    # weights_only: the checkpoint must load without unpickling code (what rotnet.checkpoint promises)
    return torch.load(Path(out) / "checkpoint.pt", map_location="cpu", weights_only=True)


def params(ckpt: dict) -> dict[str, torch.Tensor]:
    """Trainable tensors only: BN running_var uses an n/(n-1) correction that depends on the
    per-rank batch size, and is not a parameter."""
    return {k: v for k, v in ckpt["model"].items() if not k.endswith(("running_mean", "running_var",
                                                                       "num_batches_tracked"))}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def write_png(path: Path, hwc: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(hwc).save(path)   # PNG: lossless, so symmetries survive the round trip


def smooth_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3): 8x8-pixel blocks of random colour, so conv features are not just noise."""
    small = rng.integers(0, 256, (-(-h // 8), -(-w // 8), 3), dtype=np.uint8)   # ceil: then crop
    return np.kron(small, np.ones((8, 8, 1), np.uint8))[:h, :w]


def d2_symmetric(rng: np.random.Generator, size: int) -> np.ndarray:
    """Square image equal to its left-right and top-bottom mirror images."""
    q = smooth_noise(rng, size // 2, size // 2)
    top = np.concatenate([q, q[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def make_paired_dataset(root: Path, n: int, global_batch: int, seed: int = 0) -> Path:
    """ROOT/train/c0/iNNN.png laid out for the DDP equivalence test (module docstring)."""
    from pipelines.torch_loader import EpochSampler

    order = EpochSampler(n, global_batch, rank=0, world=1, train=True, seed=seed).indices()  # epoch 0
    assert sorted(order) == list(range(n)), "n must be a multiple of the global batch"
    rng = np.random.default_rng(1234)
    for m in range(n // 2):
        x = d2_symmetric(rng, CROP)
        write_png(root / "train" / "c0" / f"i{order[2 * m]:04d}.png", x)
        write_png(root / "train" / "c0" / f"i{order[2 * m + 1]:04d}.png", np.ascontiguousarray(np.rot90(x)))
    return root


def make_random_dataset(root: Path, n: int, seed: int = 0, classes: int = 2, updown: bool = False) -> Path:
    """ROOT/train/cK/*.png of random sizes (so random-resized crops differ); `updown`: a
    bright-top/dark-bottom gradient gives an easy, learnable upright orientation."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(CROP, CROP + 40, 2))
        img = smooth_noise(rng, h, w).astype(np.float32) * 0.35
        if updown:
            img += np.linspace(200, 0, h, dtype=np.float32)[:, None, None]
        write_png(root / "train" / f"c{i % classes}" / f"i{i:04d}.png", img.clip(0, 255).astype(np.uint8))
    return root


def image_multiset(batch: torch.Tensor) -> collections.Counter:
    return collections.Counter(bytes(img.contiguous().numpy()) for img in batch)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes (its direct children), from /proc."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


# ---------------------------------------------------------------------------- fixtures

N_PER_RANK, STEPS = 4, 3


@pytest.fixture(scope="module")
def paired_data(tmp_path_factory) -> Path:
    return make_paired_dataset(tmp_path_factory.mktemp("paired"), n=2 * N_PER_RANK * STEPS,
                               global_batch=2 * N_PER_RANK)


@pytest.fixture(scope="module")
def ddp_run(paired_data, tmp_path_factory) -> Path:
    """The 2-process single-node reference run (torchrun --standalone)."""
    out = tmp_path_factory.mktemp("ddp2")
    p = run([*TORCHRUN, "--standalone", "--nproc_per_node=2",
             *train_args(out, paired_data, f"optim.batch_size_per_gpu={N_PER_RANK}", "optim.epochs=1",
                         *WHOLE)])
    assert "launcher torchrun | world size 2" in p.stderr
    return out


# ---------------------------------------------------------------------------- tests

def test_paired_data_gives_equal_bn_statistics(paired_data):
    """Precondition of the equivalence test, checked through the loaders train.py uses."""
    from pipelines import build_rotation_loader
    from rotnet.config import load_config
    from rotnet.distributed import DistInfo

    cfg = load_config(REPO / "configs/sample.yaml", TINY + WHOLE)
    split = str(paired_data / "train")

    def loader(rank, world, batch):
        return build_rotation_loader(cfg, split, batch_size=batch, train=True, seed=0,
                                     info=DistInfo(rank=rank, world_size=world, local_rank=rank))

    single, r0, r1 = loader(0, 1, 2 * N_PER_RANK), loader(0, 2, N_PER_RANK), loader(1, 2, N_PER_RANK)
    assert len(single) == len(r0) == len(r1) == STEPS
    for (xs, _), (x0, y0), (x1, y1) in zip(single, r0, r1):
        assert image_multiset(x0) == image_multiset(x1), "ranks' batches must hold the same inputs"
        assert image_multiset(xs) == image_multiset(x0) + image_multiset(x1), "global batch != union"
        pairs0 = collections.Counter(zip(map(bytes, x0.numpy()), y0.tolist()))
        pairs1 = collections.Counter(zip(map(bytes, x1.numpy()), y1.tolist()))
        assert pairs0 != pairs1, "ranks must see different (image, label) pairs"


@pytest.mark.slow
def test_two_ranks_equal_one_rank_same_global_batch(paired_data, ddp_run, tmp_path, one_thread, cpu_only):
    single = tmp_path / "single"   # in this process: one thread and the CPU, as run_env gives the ranks
    train_in_process(train_args(single, paired_data, f"optim.batch_size_per_gpu={2 * N_PER_RANK}",
                                "optim.epochs=1", *WHOLE)[1:])
    a, b = load_ckpt(single), load_ckpt(ddp_run)
    assert a["step"] == b["step"] == STEPS and b["world_size"] == 2
    diff = max_abs_diff(params(a), params(b))
    # Not bit-equal: the 2N-sample convolution backward sums in another order than two N-sample
    # ones plus an all-reduce; fp32 rounding over 3 SGD steps stays far below 1e-5.
    assert diff < 1e-5, f"1 rank x {2 * N_PER_RANK} vs 2 ranks x {N_PER_RANK}: max |diff| {diff:.3g}"
    moved = max_abs_diff(params(a), params({"model": initial_weights().state_dict()}))
    assert moved > 1e-3, f"training hardly moved the weights ({moved:.3g}): the comparison says nothing"


def initial_weights():
    """The model as train.py builds it before step 0 (same seed, same constructor)."""
    from models import build_model
    from rotnet.config import load_config

    cfg = load_config(REPO / "configs/sample.yaml", TINY)
    return build_model(cfg, cfg.train.seed)


@pytest.mark.slow
def test_two_nodes_on_loopback_match_single_node(paired_data, ddp_run, tmp_path):
    """Two torchrun launchers (--nnodes=2, one worker each), c10d rendezvous on 127.0.0.1."""
    out, port = tmp_path / "two_nodes", free_port()
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
              "--rdzv_id=loopback", "--local-addr=127.0.0.1"]
    args = train_args(out, paired_data, f"optim.batch_size_per_gpu={N_PER_RANK}", "optim.epochs=1", *WHOLE)
    procs = [subprocess.Popen([*TORCHRUN, *common, f"--node_rank={r}", f"--rdzv_conf=is_host={int(r == 0)}",
                               *args], cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(tail(t) for t in logs)
    assert "world size 2" in "".join(logs)
    a, b = load_ckpt(out), load_ckpt(ddp_run)
    # Same world size, same gloo all-reduce, same data per rank: bit-equal to the 1-node run.
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_killed_rank_is_restarted_and_run_finishes(tmp_path):
    """SIGKILL rank 1 mid-run under torchrun --max-restarts=1: the group restarts, resumes from
    the last epoch checkpoint and finishes. No test hook in train.py needed: the kill comes
    from outside, once.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch 2.14's default (workers share the
    rendezvous TCP store), the restarted gloo group reads the previous attempt's addresses and
    either fails ("connectFullMesh ... Connection refused") or hangs (pytorch/pytorch#135712).
    slurm/lib.sh sets it for torchrun mode too."""
    data = make_random_dataset(tmp_path / "data", n=16)
    out, epochs = tmp_path / "run", 40     # 16 images / (2 x 4) = 2 steps per epoch
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.2",
           *train_args(out, data, "optim.batch_size_per_gpu=4", f"optim.epochs={epochs}")]
    p = subprocess.Popen(cmd, cwd=REPO, env=run_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        killed, deadline = None, time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and p.poll() is None:
            done = (out / "log.jsonl").read_text().count("\n") if (out / "log.jsonl").exists() else 0
            ranks = worker_pids(p.pid)
            if done >= 3 and 1 in ranks:
                os.kill(ranks[1], signal.SIGKILL)
                killed = done
            time.sleep(0.05)
        text = p.communicate(timeout=150)[0]
    finally:
        p.kill()
    assert killed is not None and killed < epochs, f"rank 1 was not killed mid-run\n{tail(text)}"
    assert p.returncode == 0, tail(text)
    assert "resumed from" in text, tail(text)
    ckpt = load_ckpt(out)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (epochs, 0, 2 * epochs)
