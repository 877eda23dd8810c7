"""Thin iterator over a DALI `rotation_graph` pipeline: epochs, step counts, state, errors.

DALI's own DALIGenericIterator is not used: its step count follows each rank's shard size
(ranks can differ by one step -> DDP hang). This wrapper runs the pipeline itself, fed by
`pipelines.feed.Feed` (image folders and tar shards alike): iteration i is step i % T of epoch
i // T in the order `rank_indices` gives (the torch backend's), so a reader epoch is exactly
the T steps, with no padding:
  training:   T = floor(floor(M / W) / P) full batches on every rank (equal step counts);
  validation: this rank's contiguous shard, ceil(S_r / P) batches, the last one smaller: every
              image once over all ranks, no padding, no drops. Step counts can differ by one
              between ranks, so do collectives after the loop (sum, then all_reduce).
"""
from __future__ import annotations

import functools
import io
import re

import torch

from pipelines.contract import Loader, LoaderSpec
from pipelines.cpu_finisher import CpuFinisher
from pipelines.dali_graph import external_reader, rotation_graph
from pipelines.feed import Feed
from pipelines.listing import BadImageError
from pipelines.recipe import repair_advice
from rotnet.cli import InputError


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """DALI TensorList (uniform shape) -> a new torch tensor (a copy: DALI reuses its buffers), on
    `device` for GPU TensorLists, on the CPU for CPU ones (labels, even in a GPU pipeline)."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = tl.as_tensor()  # dense (B, ...) view; shapes are uniform (square crops)
    gpu = isinstance(tl, TensorListGPU)
    out = torch.empty(tuple(t.shape()), dtype=to_torch_type[t.dtype], device=device if gpu else "cpu")
    # GPU: the copy is ordered on torch's current stream, so later torch work sees the data
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device) if gpu else None)
    return out


def mixed_decoder_args(how, train: bool) -> dict:
    """Arguments of the GPU ("mixed") decoder from LoaderConfig `how`: the nvJPEG paddings only when
    set (> 0) and only for training pipelines, else DALI's defaults (see LoaderConfig)."""
    pads = dict(device_memory_padding=how.device_memory_padding, host_memory_padding=how.host_memory_padding)
    return dict(hw_decoder_load=how.hw_decoder_load, **{k: v for k, v in pads.items() if v > 0 and train})


class DaliLoader(Loader):
    """Iterable of (images, labels); see pipelines/__init__.py for the contract.

    `self.step` counts pipeline runs of the reader epoch, the discarded tail included.
    """

    backend = "dali"

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        self._gpu = spec.device.type == "cuda"
        # CPU: the graph stops after decode + crop and torch/OpenCV finish the batch (faster on
        # CPU, see pipelines/cpu_finisher.py); GPU: everything in the graph. loader.dali_rotate_in_graph
        # forces the full graph on CPU too.
        full = self._gpu or spec.loader.dali_rotate_in_graph
        self._finisher = None if full else CpuFinisher(spec.data.crop_size, list(spec.rotations), spec.mode,
                                                       threads=spec.loader.num_threads)
        self._feed = None                    # the Feed of the current pipe (kept after a failure: `_explain`)
        self._pipe = None
        self._checkpoint = None              # restored checkpoint, used when the pipe is built

    def _build_pipe(self):
        s, d, how = self.spec, self.spec.data, self.spec.loader
        if self._feed is not None:
            self._feed.close()
        feed = self._feed = Feed(s, self._steps)
        pipe = rotation_graph(
            reader=functools.partial(external_reader, feed), train=s.train, recipe=d.recipe,
            crop=d.crop_size, resize=d.resize_size, min_scale=d.min_scale,
            rotations=list(s.rotations), mode=s.mode, decoder_device="mixed" if self._gpu else "cpu",
            mixed_args=mixed_decoder_args(how, s.train) if self._gpu else {},
            normalize=s.normalize, mean=list(d.mean), std=list(d.std),
            stage="host" if self._finisher else "full",
            batch_size=s.pipe_batch, num_threads=max(1, how.num_threads),
            device_id=(s.device.index if s.device.index is not None else s.local_rank) if self._gpu else None,
            seed=s.seed_for("augment", s.rank),  # augmentation randomness: per global rank
            prefetch_queue_depth=max(1, how.prefetch), checkpoint=self._checkpoint)
        pipe.build()
        return pipe

    # ------------------------------------------------------------ state hooks
    def _end_epoch(self) -> None:
        """Run the rest of a started reader epoch (discarded), so the next epoch starts on its
        boundary. Also right after the loop, so that a checkpoint taken then points there."""
        while 0 < self.step < self._steps:
            self._run()
            self.step += 1

    def _extra_state(self) -> dict:
        ckpt = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {"dali_checkpoint": ckpt or "", "rank": self.spec.rank, "reader": "feed"}

    def _restore(self, state: dict) -> None:
        if state.get("reader") != "feed" and state["format"] == "folder" and state["dali_checkpoint"]:
            raise InputError("loader state is from an earlier rotnet's DALI folder reader (readers.file), "
                             "whose order this one's feed cannot continue: resume with that rotnet")
        self._checkpoint = state["dali_checkpoint"] or None
        self._pipe = None                    # rebuilt from the checkpoint on next use

    # ------------------------------------------------------------ iteration
    def _run(self):
        if self._pipe is None:
            self._pipe = self._build_pipe()
        try:
            if self._gpu:  # outputs bound to torch's stream, where the copies out are queued: without
                return self._pipe.run(torch.cuda.current_stream(self.spec.device))  # it, run() syncs the host
            return self._pipe.run()
        except RuntimeError as e:
            self._pipe = None                # DALI: "pipeline object is no longer valid"
            if not is_decode_failure(str(e)):
                raise                        # out of memory, a missing CUDA library, ...: as it is
            raise BadImageError(self._explain(str(e))) from e

    def _explain(self, message: str) -> str:
        """A clear message naming the bad file(s): the samples of the steps in flight, decoded with PIL."""
        from pipelines.scan import check_image

        feed = self._feed
        bad = [self.spec.paths[j] for j in feed.in_flight() if check_image(io.BytesIO(feed.read(j)))]
        first = message.strip().splitlines()[-1] if message.strip() else ""
        where = ("bad image file(s): " + ", ".join(repr(p) for p in bad[:10])) if bad \
            else "a file could not be decoded (DALI did not name it)"
        return f"{where}. {repair_advice(self.spec.shards is not None)} DALI said: {first}"

    def read_only_batches(self, epoch: int):
        """This rank's steps of `epoch` as the pipeline's feed reads them (reads_in_flight at a time),
        without decoding: per step, the list of encoded samples (uint8 arrays). For benchmarks."""
        feed = Feed(self.spec, self._steps)
        try:
            for i in range(epoch * self._steps, (epoch + 1) * self._steps):
                yield feed(i)[0]
        finally:
            feed.close()

    def _batches(self):
        p, shard = self.spec.pipe_batch, self._shard[1] - self._shard[0]
        while self.step < self._steps:
            yield self._convert(self._run(), valid=min(p, shard - self.step * p))

    def _convert(self, outs, valid: int):
        """Pipeline outputs -> `assemble`'s input, trimmed to the `valid` (non-padding) samples."""
        if self._finisher is None:
            images, labels = outs
            y = None if self.spec.mode == "all" else _to_torch(labels, self.spec.device)[:valid]
            return _to_torch(images, self.spec.device)[:valid], y
        import numpy as np

        crops, labels, flips, rot = outs
        # Zero-copy views of DALI's buffers: valid until the next run(), and used up before it.
        views = [torch.from_numpy(np.asarray(crops[i])) for i in range(valid)]
        f = np.asarray(flips.as_tensor()).reshape(-1)[:valid].tolist()
        r = np.asarray(rot.as_tensor()).reshape(-1)[:valid].tolist()
        y = r if self.spec.mode == "one_random" else np.asarray(labels.as_tensor()).reshape(-1)[:valid]
        return self._finisher(views, f, r), torch.as_tensor(y)


# Only these DALI errors mean "a file is not a decodable image": a decoder naming the sample it
# could not decode, or nvImageCodec's code-stream statuses (3 bad, 4 unsupported, 13/14 the same
# from an extension, 19 incomplete). Memory and CUDA errors are never the file's fault.
_DECODE_FAILURE = re.compile(r"Failed to decode sample #|nvImageCodec failure: '#(?:3|4|13|14|19)'")
_NOT_THE_FILE = re.compile(r"out of memory|CUDA error|cudaError|CUDA_ERROR", re.IGNORECASE)


def is_decode_failure(message: str) -> bool:
    return bool(_DECODE_FAILURE.search(message)) and not _NOT_THE_FILE.search(message)
