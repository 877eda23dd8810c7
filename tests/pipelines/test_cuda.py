"""The GPU side of the contract (skipped without CUDA): outputs on the device, fp16 graph normalisation,
mixed decode for DALI, exact rotations of device-resident images."""
import numpy as np
import pytest
import torch

from pipelines import build_class_loader, build_rotation_loader, prepare_batch
from rotnet.distributed import DistInfo
from tests.pipelines.images import KINDS, cfg, corrupt_jpeg, encoded, textured

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU = torch.device("cuda", 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cuda_rotation_loader(square_split, kind, train):
    _, over = kind
    exact = build_rotation_loader(cfg(normalize="trainer", **over), square_split, batch_size=3,
                                  info=DistInfo(device=GPU), train=train, seed=0)
    x, y = next(iter(exact))
    assert x.device.type == "cuda" and y.device.type == "cuda"
    assert x.dtype == torch.uint8 and x.shape == (12, 32, 32, 3) and y.tolist() == [0, 1, 2, 3] * 3
    for i in range(3):
        for r in range(4):
            assert torch.equal(x[4 * i + r], torch.rot90(x[4 * i], r, dims=(0, 1)))
    normed = build_rotation_loader(cfg(**over), square_split, batch_size=3, info=DistInfo(device=GPU),
                                   train=train, seed=0)
    z, _ = next(iter(normed))  # normalize="auto" on cuda: float16 (B, C, H, W) from the loader
    assert z.dtype == torch.float16 and z.shape == (12, 3, 32, 32) and z.device.type == "cuda"
    assert prepare_batch(z, cfg().data, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    # deterministic crops: same pixels either way (fp16 tolerance; nvJPEG may differ by 1-2 levels)
    if not train:
        ref = prepare_batch(x, cfg().data, channels_last=False)
        assert (z.float() - ref).abs().mean() < 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_class_loader(square_split, kind):
    _, over = kind
    lo = build_class_loader(cfg(**over), square_split, batch_size=4, info=DistInfo(device=GPU), train=False,
                            seed=0)
    labels = torch.cat([y for _, y in lo])
    assert labels.device.type == "cuda" and sorted(labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_loaders_read_a_jpeg_with_corrupt_data_as_the_cpu_decoders_do(tmp_path, kind):
    """A JPEG whose image data is corrupt but decodable (DALI's CPU decoder and the torch backends read
    on): the GPU loaders read it too (nvJPEG, or DALI's CPU fallback), so no backend refuses it alone."""
    rng = np.random.default_rng(7)
    c0 = tmp_path / "train" / "c0"
    c0.mkdir(parents=True)
    (c0 / "plain.JPEG").write_bytes(encoded(textured(rng, 48, 64), "JPEG"))
    (c0 / "corrupt.JPEG").write_bytes(corrupt_jpeg(encoded(rng.integers(0, 256, (48, 64, 3), np.uint8),
                                                           "JPEG"), at=100))
    _, over = kind
    lo = build_class_loader(cfg(**over), str(tmp_path / "train"), batch_size=2, info=DistInfo(device=GPU),
                            train=False, seed=0)
    (x, y), = list(lo)
    assert x.shape[0] == 2 and y.tolist() == [0, 0]
