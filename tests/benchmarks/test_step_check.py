"""benchmarks/step_check.py on the CPU: train.py's step makes none of the calls that would make the
host wait for a GPU outside the logging window (.item(), .tolist(), .cpu(), .numpy(), a tensor built
from Python values onto the device), and a planted one is found and named by its line."""
import signal
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import step_check
from pipelines import rotation_loaders
from rotnet.config import load_config
from rotnet.distributed import DistInfo
from rotnet.progress import RunLogger
from tests.pipelines.images import make_folder
from train import build_run, resolve

REPO = Path(__file__).resolve().parents[2]
# 16 images, 4 per step: 4 steps an epoch; log_every 3 puts window ends inside and at the end of epochs
TOY = ["model.width=0.25", "data.crop_size=64", "data.resize_size=72", "optim.batch_size_per_gpu=4",
       "train.precision=fp32", "train.log_every=3", "loader.backend=torch", "loader.num_threads=0"]
STEPS = 7   # after 2 warm-up steps: epoch 1 whole (window ends at its steps 3 and 4) and 3 steps of epoch 2


@pytest.fixture
def tiny(tmp_path, one_thread):
    """(run, loader) of the sample config at toy sizes; build_run's stop handlers restored after."""
    make_folder(tmp_path / "train", [8, 8], size=(72, 72))
    cfg = resolve(load_config(REPO / "configs/sample.yaml", [f"data.root={tmp_path}", *TOY]), DistInfo())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    run = build_run(cfg, DistInfo(), RunLogger(tmp_path, is_main=False), loaders=False)
    loader, _ = rotation_loaders(cfg, DistInfo(), val=False)   # as step_check.main builds it
    yield run, loader
    for s, h in handlers.items():
        signal.signal(s, h)


def test_the_training_step_would_not_sync_a_gpu(tiny):
    run, loader = tiny
    found, epoch = step_check.check_syncs(run, loader, STEPS, warmup=2)
    assert not found, found
    assert run.step == 2 + STEPS and epoch == 3   # the steps ran, over epochs 0, 1 and 2


def test_a_planted_sync_is_counted_per_step_at_its_line(tiny):
    run, loader = tiny
    prepare = run.prepare

    def syncing(images):
        images.float().mean().item()                                    # a host sync on CUDA
        torch.tensor(images.shape[0], device=images.device)             # a blocking copy on CUDA
        return prepare(images)

    run.prepare = syncing
    found, _ = step_check.check_syncs(run, loader, STEPS, warmup=0)
    assert sorted(found.values()) == [STEPS, STEPS], found
    scalar = step_check.SYNC_OPS[torch.ops.aten._local_scalar_dense.default]
    assert {what.split(" at ")[0] for what in found} == {scalar, "torch.tensor(..., device=)"}
    assert all(what.split(" at ")[1].startswith(__file__) for what in found), found


def test_every_kind_of_sync_planted_in_the_step_is_counted_at_its_line(tiny):
    """What the .item() patch alone missed: float(), bool(), int(), .to("cpu"), nonzero, masks;
    a dtype change is not a sync, nor a look at the loader's own (host) tensor."""
    run, loader = tiny
    prepare = run.prepare
    planted = {}

    def syncing(images):
        x = prepare(images)
        here = sys._getframe().f_lineno
        float(x.mean())                     # +1
        bool(x.sum() > 0)                   # +2
        int(x[0, 0, 0, 0])                  # +3
        x.to("cpu")                         # +4
        x.nonzero()                         # +5
        x[x > 0]                            # +6
        x.masked_select(x > 0)              # +7
        x.cpu(), x.tolist(), x.numpy()      # +8
        x.to(torch.float16), images.cpu(), images.to("cpu"), images.numpy()   # none of these
        planted.update(here=here)
        return x

    run.prepare = syncing
    found, _ = step_check.check_syncs(run, loader, STEPS, warmup=0)
    by_line = {}
    for what, n in found.items():
        name, where = what.split(" at ")
        assert where.startswith(__file__) and n == STEPS, found
        by_line.setdefault(int(where.rsplit(":", 1)[1]) - planted["here"], set()).add(name)
    scalar = step_check.SYNC_OPS[torch.ops.aten._local_scalar_dense.default]
    assert by_line == {1: {scalar}, 2: {scalar}, 3: {scalar}, 4: {'.to("cpu")'}, 5: {"nonzero"},
                       6: {"boolean-mask indexing (nonzero)"}, 7: {"masked_select"},
                       8: {".cpu()", ".tolist()", ".numpy()"}}, found


def test_a_copy_from_a_device_to_the_cpu_is_a_sync():
    """The dispatched rule, for real device tensors (here 'meta', which every torch build has)."""
    aten, meta = torch.ops.aten, torch.empty(2, device="meta")
    cpu = torch.device("cpu")
    assert step_check.sync_op(aten._to_copy.default, (meta,), {"device": cpu}) == "copy to the CPU"
    assert step_check.sync_op(aten.copy_.default, (torch.empty(2), meta), {}) == "copy to the CPU"
    assert step_check.sync_op(aten._to_copy.default, (torch.empty(2),), {"device": "meta"}) is None


def test_the_loader_is_checked_only_for_tensors_built_onto_a_device(tiny):
    """A loader's own CPU work (.tolist() of its random draws) is not a GPU sync; an index tensor
    built with device= from a Python list is (a blocking host-to-device copy on CUDA)."""
    run, loader = tiny

    class Loader:
        set_epoch = loader.set_epoch

        def __len__(self):
            return len(loader)

        def __iter__(self):
            for images, labels in loader:
                torch.rand(3).tolist()
                yield images, labels[torch.tensor(list(range(len(labels))), device=labels.device)]

    found, _ = step_check.check_syncs(run, Loader(), STEPS, warmup=0)
    assert list(found.values()) == [STEPS] and "torch.tensor(..., device=)" in next(iter(found)), found
