"""The torch-side recipe (pipelines.recipe): its CIFAR fast path, and the DALI graph form of it."""
import pytest
import torch

from pipelines import build_class_loader
from pipelines.recipe import crop_batch
from tests.pipelines.images import cfg, make_folder, needs_dali


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cifar_gather_equals_per_image_path(seed):
    """The one-gather fast path (stacked crop-sized images) = pad 4, crop, flip image by image."""
    d = cfg(recipe="cifar", crop_size=8).data
    x = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    fast = crop_batch(x, d, True, torch.Generator().manual_seed(seed))
    slow = crop_batch(list(x), d, True, torch.Generator().manual_seed(seed))
    assert fast.shape == (6, 8, 8, 3) and torch.equal(fast, slow)
    g = torch.Generator().manual_seed(seed)  # the draws, in the recipe's order: flips, then offsets
    flip, off = torch.rand(6, generator=g) < 0.5, torch.randint(0, 9, (6, 2), generator=g)
    padded = torch.nn.functional.pad(x, (0, 0, 4, 4, 4, 4))
    for i in range(6):
        dy, dx = off[i].tolist()
        crop = padded[i, dy:dy + 8, dx:dx + 8]
        assert torch.equal(fast[i], crop.flip(1) if flip[i] else crop)


@needs_dali
@pytest.mark.parametrize("recipe", ["imagenet", "cifar"])
@pytest.mark.parametrize("size", [(40, 52), (33, 45), (45, 33), (37, 37)])
def test_dali_eval_crops_equal_torch_recipe(tmp_path, recipe, size):
    """Eval recipe: the DALI graph and the torch recipe agree to one grey level (resize rounding
    and centre offsets included), on shrinking, enlarging and odd sizes."""
    root = make_folder(tmp_path / "train", [2, 2], size=size)
    out = {}
    for backend in ("dali", "torch"):
        lo = build_class_loader(cfg(backend=backend, recipe=recipe, resize_size=36), root, batch_size=4,
                                rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), train=False,
                                seed=0)
        out[backend] = next(iter(lo))[0].float()
    assert (out["dali"] - out["torch"]).abs().max() <= 1
