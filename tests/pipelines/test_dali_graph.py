"""pipelines.dali_graph, the recipe as DALI runs it: the CPU finisher's OpenCV rotations equal the reference
(torch.rot90 of the flipped crop, pipelines.recipe.rotate_hwc); which DALI errors are a bad file."""
import pytest
import torch

from pipelines.recipe import rotate_hwc
from tests.pipelines.images import needs_dali

pytestmark = needs_dali  # the finisher belongs to the DALI CPU loader (and imports its OpenCV dependency)


@pytest.mark.parametrize("rotations", [[0, 90, 180, 270], [90, 270], [270, 0, 180], [0, 45, 90, 315]])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "view"])
def test_rotations_into_matches_rot90(rotations, flip, layout):
    from pipelines.dali_graph import rotations_into

    g = torch.Generator().manual_seed(len(rotations) + flip)
    x = torch.randint(0, 256, (17, 17, 3), dtype=torch.uint8, generator=g)
    if layout == "view":  # what resize_hwc returns: an HWC view of channels-last memory
        x = x.permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)[0].permute(1, 2, 0)
    dst = torch.full((len(rotations), 17, 17, 3), 7, dtype=torch.uint8)
    rotations_into(dst, x, flip, rotations)
    xf = x.flip(1) if flip else x
    for r, a in enumerate(rotations):
        expect = torch.rot90(xf, a // 90, dims=(0, 1)) if a % 90 == 0 else rotate_hwc(xf, a)
        assert torch.equal(dst[r], expect), (a, flip)


def test_finisher_batch_shapes_and_ragged_crops():
    from pipelines.dali_graph import CpuFinisher

    crops = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8) for h, w in [(10, 14), (20, 20), (31, 9)]]
    finish = CpuFinisher(crop=20, rotations=[0, 90, 180, 270], mode="all", threads=2)
    out = finish(crops, [0, 1, 0], [0, 0, 0])
    assert out.shape == (3, 4, 20, 20, 3) and out.dtype == torch.uint8
    assert torch.equal(out[1, 0], crops[1].flip(1))          # 20 x 20: no resize, flipped
    assert torch.equal(out[1, 1], torch.rot90(crops[1].flip(1), 1, (0, 1)))
    finish_one = CpuFinisher(crop=20, rotations=[0, 90, 180, 270], mode="one_random", threads=1)
    one = finish_one(crops, [0, 0, 0], [2, 1, 3])
    assert one.shape == (3, 20, 20, 3) and torch.equal(one[1], torch.rot90(crops[1], 1, (0, 1)))


@pytest.mark.parametrize("hw", [(10, 14), (20, 9), (31, 40), (25, 12)])
def test_resize_hwc_close_to_torch_bilinear(hw):
    """OpenCV (enlarging) and torch (shrinking) paths both equal torch's antialiased bilinear to +-1."""
    from pipelines.dali_graph import resize_hwc

    x = torch.randint(0, 256, (*hw, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(hw[0]))
    out = resize_hwc(x, 20)
    ref = torch.nn.functional.interpolate(x.permute(2, 0, 1)[None].float(), size=(20, 20), mode="bilinear",
                                          antialias=True, align_corners=False)[0].permute(1, 2, 0)
    assert out.shape == (20, 20, 3) and out.dtype == torch.uint8
    assert (out.float() - ref).abs().max() <= 1.0


def test_decode_failures_are_told_from_other_errors():
    from pipelines.dali_graph import is_decode_failure

    decoder = "Error in CPU operator `nvidia.dali.fn.decoders.image`,\n...\nencountered:\n\n"
    assert is_decode_failure(decoder + "Failed to decode sample #6 : c1/trunc.JPEG")  # as DALI 2.4 says it
    assert is_decode_failure(decoder + "nvImageCodec failure: '#4'")                  # not an image at all
    assert not is_decode_failure(decoder + "nvImageCodec failure: '#5'")              # allocator failure
    assert not is_decode_failure(decoder + "Failed to decode sample #1 : a.jpg\nCUDA error: out of memory")
    assert not is_decode_failure("libnvjpeg.so.12: cannot open shared object file: No such file or directory")


def test_errors_that_may_be_a_file_are_told_from_the_device_s_and_the_codec_s():
    from pipelines.dali_graph import decoder_said, may_be_a_file

    decoder = "Error in CPU operator `nvidia.dali.fn.decoders.image`,\n...\nencountered:\n\n"
    assert may_be_a_file(decoder + "Invalid sample_type: 8197\nCurrent pipeline object is no longer valid.")
    assert may_be_a_file(decoder + "nvImageCodec failure: '#2'")          # 0x0 samples (or a bug)
    assert may_be_a_file(decoder + "nvImageCodec failure: '#4'")
    assert may_be_a_file(decoder + "nvImageCodec failure: '#17'")         # a PNG cut short (or a bug)
    assert not may_be_a_file(decoder + "nvImageCodec failure: '#10'")     # a codec's dependency missing
    assert not may_be_a_file(decoder + "nvImageCodec failure: '#5'")      # allocator failure
    assert not may_be_a_file(decoder + "CUDA error: out of memory")
    assert decoder_said(decoder + "Invalid sample_type: 8197\nCurrent pipeline object is no longer valid.") \
        == "Invalid sample_type: 8197"
    assert decoder_said("Critical error\nsomething else") == "something else"
