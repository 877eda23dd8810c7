"""Loader-side normalisation (loader.normalize=graph) meets the model: dtype and memory layout."""
import pytest
import torch

from pipelines import build_rotation_loader, prepare_batch
from tests.pipelines.images import cfg, needs_dali

CPU = torch.device("cpu")
# every loader that can normalise itself on CPU (loader.normalize=graph); dali-graph = the GPU graph
VARIANTS = [pytest.param(dict(backend="dali"), id="dali", marks=needs_dali),
            pytest.param(dict(backend="dali", dali_rotate_in_graph=True), id="dali-graph", marks=needs_dali),
            pytest.param(dict(backend="torch"), id="torch"),
            pytest.param(dict(backend="torch", resident=True), id="resident")]


def first(split, over, **kw):
    lo = build_rotation_loader(cfg(**over, **kw), split, batch_size=2, rank=0, world_size=1, local_rank=0,
                               device=CPU, train=False, seed=0)
    return next(iter(lo))


@pytest.mark.parametrize("over", VARIANTS)
def test_fp32_model_gets_float32_and_autocast_runs_copy_nothing(square_split, over):
    """train.precision=fp32 with loader normalisation: prepare_batch as the trainer calls it gives the
    float32 a float32 model takes; dtype=None (autocast runs) returns the loader's tensor itself."""
    x16, _ = first(square_split, over, normalize="graph")
    assert x16.dtype == torch.float16 and x16.shape == (8, 3, 32, 32)
    assert x16.is_contiguous(memory_format=torch.channels_last)  # NHWC memory, as the graph wrote it
    x = prepare_batch(x16, cfg().data, channels_last=True)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)  # a float32 model, no autocast
    assert x.dtype == torch.float32 and conv(x).dtype == torch.float32
    same = prepare_batch(x16, cfg().data, channels_last=True, dtype=None)
    assert same.data_ptr() == x16.data_ptr() and same.dtype == torch.float16  # bf16/fp16 runs: no copy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(same).dtype == torch.bfloat16


@pytest.mark.parametrize("over", VARIANTS)
def test_loader_normalisation_equals_trainer_normalisation(square_split, over):
    """Same pixels whichever side normalises; the loader's output is already channels_last."""
    x8, y8 = first(square_split, over)
    x16, y16 = first(square_split, over, normalize="graph")
    assert torch.equal(y8, y16)
    ref = prepare_batch(x8, cfg().data, channels_last=True)
    torch.testing.assert_close(prepare_batch(x16, cfg().data, channels_last=True), ref, atol=2e-2, rtol=1e-2)
