"""The torch backend's DataLoader workers pin glibc's mmap threshold (else a worker's heap grows
with every step of decoded ImageNet-sized images; benchmarks/scale.py's leak stage measures it)."""
import ctypes

from pipelines import build_rotation_loader
from pipelines.torch_backend import fix_mmap_threshold
from tests.pipelines.images import cfg, make_folder


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
