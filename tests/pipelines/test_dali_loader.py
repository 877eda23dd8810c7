"""The DALI loader's GPU-facing choices, checked on CPU: decoder arguments, which errors are bad images."""
import pytest
import torch

from pipelines import BadImageError, build_rotation_loader
from tests.pipelines.images import cfg, needs_dali

pytestmark = needs_dali


def test_decoder_paddings_default_to_dali_and_stay_off_validation():
    from pipelines.dali_loader import mixed_decoder_args

    assert mixed_decoder_args(cfg().loader, train=True) == {"hw_decoder_load": 0.65}  # DALI's own defaults
    big = cfg(device_memory_padding=64 << 20, host_memory_padding=32 << 20)
    assert mixed_decoder_args(big.loader, train=True) == {"hw_decoder_load": 0.65,
                                                          "device_memory_padding": 64 << 20,
                                                          "host_memory_padding": 32 << 20}
    assert mixed_decoder_args(big.loader, train=False) == {"hw_decoder_load": 0.65}


def test_decode_failures_are_told_from_other_errors():
    from pipelines.dali_loader import is_decode_failure

    decoder = "Error in CPU operator `nvidia.dali.fn.decoders.image`,\n...\nencountered:\n\n"
    assert is_decode_failure(decoder + "Failed to decode sample #6 : c1/trunc.JPEG")  # as DALI 2.4 says it
    assert is_decode_failure(decoder + "nvImageCodec failure: '#4'")                  # not an image at all
    assert not is_decode_failure(decoder + "nvImageCodec failure: '#5'")              # allocator failure
    assert not is_decode_failure(decoder + "Failed to decode sample #1 : a.jpg\nCUDA error: out of memory")
    assert not is_decode_failure("libnvjpeg.so.12: cannot open shared object file: No such file or directory")


@pytest.mark.parametrize("message", ["CUDA error: out of memory",
                                     "Error in MIXED operator `nvidia.dali.fn.decoders.image`: nvImageCodec "
                                     "failure: '#10'"])
def test_non_decode_error_is_raised_as_is_without_a_scan(square_split, monkeypatch, message):
    """An out-of-memory (or a missing library) is not a bad image: no BadImageError, no file decoded."""
    from nvidia.dali.pipeline import Pipeline

    import pipelines.scan

    def fail(pipe, *args):
        # no reference to the pipeline in the traceback: freed later by the garbage collector in a
        # forked DataLoader worker (of a later test), DALI's shutdown deadlocks there
        del pipe
        raise RuntimeError(message)

    monkeypatch.setattr(Pipeline, "run", fail)
    monkeypatch.setattr(pipelines.scan, "check_image", lambda f: pytest.fail("decoded the files in flight"))
    lo = build_rotation_loader(cfg(backend="dali"), square_split, batch_size=2, rank=0, world_size=1,
                               local_rank=0, device=torch.device("cpu"), train=True, seed=0)
    with pytest.raises(RuntimeError) as info:
        next(iter(lo))
    assert not isinstance(info.value, BadImageError) and str(info.value) == message
