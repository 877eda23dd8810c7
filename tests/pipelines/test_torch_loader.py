"""The torch loader: its two sources of images (files decoded every epoch, or loader.resident) make the
same batches; its DataLoader workers pin glibc's mmap threshold (else a worker's heap grows with every
step of decoded ImageNet-sized images; benchmarks/scale.py's leak stage measures it)."""
import ctypes
import os
import sys

import pytest
import torch

from pipelines import build_class_loader, build_rotation_loader
from pipelines.torch_loader import fix_mmap_threshold
from tests.pipelines.images import cfg, make_folder


@pytest.mark.parametrize("recipe", ["imagenet", "cifar"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("build", [build_rotation_loader, build_class_loader])
def test_resident_images_make_the_streamed_batches(tmp_path, recipe, train, build):
    """One loader, two image sources: decoded once and kept (resident) or decoded every step; the same
    seed gives the same batches, across an epoch boundary too."""
    split = make_folder(tmp_path / "train", [3, 3], size=(36, 44))
    batches = [[], []]
    for resident, out in zip((False, True), batches):
        loader = build(cfg(backend="torch", resident=resident, num_threads=0, recipe=recipe), split,
                       batch_size=2, rank=0, world_size=1, local_rank=0, device="cpu", train=train, seed=3)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            out.extend(loader)
    assert len(batches[0]) == len(batches[1]) > 0
    for (x, y), (xr, yr) in zip(*batches):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_workers_start_with_a_fixed_mmap_threshold(tmp_path):
    split = make_folder(tmp_path / "train", [4, 4])
    with_workers = build_rotation_loader(cfg(backend="torch", num_threads=1), split, batch_size=2, rank=0,
                                         world_size=1, local_rank=0, device="cpu", train=True, seed=0)
    in_process = build_rotation_loader(cfg(backend="torch", num_threads=0), split, batch_size=2, rank=0,
                                       world_size=1, local_rank=0, device="cpu", train=True, seed=0)
    assert with_workers._loader.worker_init_fn is fix_mmap_threshold
    assert in_process._loader.worker_init_fn is None

def test_fix_mmap_threshold_calls_mallopt(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    fix_mmap_threshold(3)
    assert calls == [(-3, 128 * 1024)]
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    fix_mmap_threshold(0)          # no glibc: nothing to do, no error
    assert len(calls) == 1


def _worker_private_mb_per_epoch(root, epochs: int, fixed: bool) -> list[float]:
    """USS of the loader's one DataLoader worker after each epoch (4 steps of 8 images each)."""
    from benchmarks.scale_stages import tree_memory_mb

    loader = build_rotation_loader(cfg(backend="torch", num_threads=1, crop_size=224, resize_size=256), root,
                                   batch_size=8, rank=0, world_size=1, local_rank=0, device="cpu", train=True,
                                   seed=0)
    if not fixed:
        loader._loader.worker_init_fn = None   # before the first epoch starts the worker
    private = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        workers = [pid for task in os.listdir("/proc/self/task")
                   for pid in open(f"/proc/self/task/{task}/children").read().split()]
        private.append(sum(tree_memory_mb(pid)["uss"] for pid in workers))
    return private


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_a_real_worker_stays_bounded_over_many_steps_and_grows_without_the_fix(tmp_path):
    """48 steps of ImageNet-sized (500x375) JPEGs in one worker. Pinned threshold: the worker's
    private memory stays within 3 MB from epoch 2 on. Without it (the same run, worker_init_fn
    off) glibc's heap fragments and the worker grows well out of that band (by 8 to 45 MB in runs
    on 2-core Xeons; how much varies from run to run), so the fix is what holds it."""
    root = make_folder(tmp_path / "train", [16, 16], size=(375, 500))
    fixed = _worker_private_mb_per_epoch(root, 12, fixed=True)
    assert max(fixed[1:]) - fixed[1] < 3, fixed
    loose = _worker_private_mb_per_epoch(root, 12, fixed=False)
    assert loose[-1] - loose[1] > 5, loose
