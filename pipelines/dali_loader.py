"""The DALI loader: a thin iterator over a `rotation_graph` pipeline (epochs, step counts, state,
errors), and `Feed`, the reader that hands the pipeline its samples' bytes.

DALI's own DALIGenericIterator is not used: its step count follows each rank's shard size
(ranks can differ by one step -> DDP hang). This wrapper runs the pipeline itself, fed by
`Feed` (image folders and tar shards alike): iteration i is step i % T of epoch
i // T in the order `rank_indices` gives (the torch backend's), so a reader epoch is exactly
the T steps, with no padding:
  training:   T = floor(floor(M / W) / P) full batches on every rank (equal step counts);
  validation: this rank's contiguous shard, ceil(S_r / P) batches, the last one smaller: every
              image once over all ranks, no padding, no drops. Step counts can differ by one
              between ranks, so do collectives after the loop (sum, then all_reduce).
The order is a function of i alone, so DALI's checkpoint (which records i) resumes it exactly.

On Lustre/GPFS/NFS a read costs milliseconds however small it is, so reading a step's samples one after
another starves the decoder. In `Feed` a pool of `reads_in_flight` threads reads the current step's
samples and those of the next steps (enough of them to keep the pool busy) while DALI decodes:
a sample is a whole file (open + read + close) or one `os.pread` of a tar, and both release the GIL.
Reads finish in any order; each step still gets its samples in its own order, because each sample's
bytes land in its own slot.

Why threads and not DALI's parallel external_source (worker processes): the reads are I/O, so the GIL is no
limit; processes would copy every batch once more through shared memory, each hold its own descriptors, and
fork a process whose DALI and CUDA state must not be touched; here a failed read is raised in the caller's
process, naming its file, at the step it belongs to.
"""
from __future__ import annotations

import functools
import gc
import os
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pipelines.batch import LoaderBase, LoaderSpec, by_rule, rank_indices, truncated
from pipelines.dali_graph import (
    CpuFinisher,
    decoder_said,
    external_reader,
    is_decode_failure,
    may_be_a_file,
    rotation_graph,
)
from pipelines.listing import BadImageError
from pipelines.recipe import repair_advice
from pipelines.scan import dali_decoding, dali_verdicts
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


class DaliLoader(LoaderBase):
    """Iterable of (images, labels); see pipelines/batch.py for the contract.

    `self.step` counts pipeline runs of the reader epoch, the discarded tail included.
    """

    backend = "dali"

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        self._gpu = spec.device.type == "cuda"
        # CPU: the graph stops after decode + crop and torch/OpenCV finish the batch (faster on
        # CPU, see pipelines/dali_graph.py); GPU: everything in the graph. loader.dali_rotate_in_graph
        # forces the full graph on CPU too.
        full = self._gpu or spec.loader.dali_rotate_in_graph
        self._finisher = None if full else CpuFinisher(spec.data.crop_size, list(spec.rotations), spec.mode,
                                                       threads=spec.loader.num_threads)
        self._feed = None                    # the current pipe's Feed (kept after a failure: its files named)
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

    # ------------------------------------------------------------ epochs and state
    def _end_epoch(self) -> None:
        """Run the rest of a started reader epoch (discarded), so the next epoch starts on its
        boundary. Also right after the loop, so that a checkpoint taken then points there."""
        while 0 < self.step < self._steps:
            self._run()
            self.step += 1

    def state_dict(self) -> dict:
        ckpt = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {**super().state_dict(), "dali_checkpoint": ckpt or "", "rank": self.spec.rank,
                "reader": "feed"}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)       # checks it is this run's, sets epoch and step
        folder = state.get("format", "folder") == "folder"   # states saved before tar shards: folders
        if state.get("reader") != "feed" and folder and state["dali_checkpoint"]:
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
            said = str(e)
            if not may_be_a_file(said):
                raise                        # out of memory, a missing codec, CUDA: as it is
            # DALI names no file: the samples in flight are judged alone, as the scan judges files
            samples = [(j, self._feed.read(j)) for j in self._feed.in_flight()]
            with dali_decoding(max(1, self.spec.loader.num_threads)) as decode:
                why = dali_verdicts([data for _, data in samples], decode)
            bad = [(self.spec.paths[j], w) for (j, _), w in zip(samples, why) if w]
            if bad or is_decode_failure(said):
                # The failed pipelines are freed here and now: DALI's frames in the traceback hold one, and
                # a later garbage collection inside a forked DataLoader worker hangs in DALI's shutdown.
                e.with_traceback(None)
                gc.collect()
                raise BadImageError(name_bad_files(self.spec, bad, f"DALI said: {decoder_said(said)}")) from e
            raise                            # a bug that looks like a file's fault ("#2"): as it is

    def read_only_batches(self, epochs):
        """This rank's steps of each epoch in `epochs` (e.g. range(2), itertools.count()) as the
        pipeline's feed reads them, without decoding: per step, the list of encoded samples (uint8
        arrays). One feed for all of them, as training keeps one, so reads run on across an epoch's
        end. For benchmarks."""
        feed = Feed(self.spec, self._steps)
        try:
            for epoch in epochs:
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


def read_file(path: str) -> bytes:
    """The whole file in as few round trips as a network file system allows: open, then one read of
    the size that fstat gave (cached from the open) plus one byte, so the short read is the end of
    the file. Python's `f.read()` asks again at the end, and on Lustre/NFS that is one more round trip
    per image."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) == size:
            return data
        # Shorter (a read cut short, or the file shrank), longer (it grew, or fstat does not know
        # its size): read on to the end, one more round trip in these rare cases only.
        rest = [data]
        while chunk := os.read(fd, 1 << 20):
            rest.append(chunk)
        return b"".join(rest)
    finally:
        os.close(fd)


def read_sample(spec, j: int) -> bytes:
    """The encoded bytes of sample j: its whole file (folders) or its tar member (shards); BadImageError
    naming it when it cannot be read or is empty."""
    name = spec.paths[j]
    try:
        data = spec.shards.read(j) if spec.shards is not None else read_file(name)
    except OSError as e:
        raise BadImageError(f"cannot read {name!r}: {e.strerror or e}") from e
    if not data:
        raise BadImageError(f"{name!r} is empty (0 bytes); remove it or list without it "
                            "(`python -m pipelines.scan SPLIT_DIR --out LIST`)")
    return data


def name_bad_files(spec, bad: list[tuple[str, str]], said: str) -> str:
    """One line naming `bad` ((file or shard member, why) pairs), with how to repair the list and what
    failed (`said`)."""
    where = (("bad image file(s): " + "; ".join(f"{p!r}: {why}" for p, why in bad[:10])) if bad
             else "a file could not be decoded (DALI did not name it)")
    return f"{where}. {repair_advice(spec.shards is not None)} {said}"


class Feed:
    """`external_source` callback: iteration i -> (uint8 (size,) arrays, int32 (B, 1) labels) of step i.

    `read(j) -> bytes` reads sample j (default `read_sample`; tests inject slow or failing readers).
    """

    def __init__(self, spec, steps: int, read=None):
        self.spec, self.steps = spec, steps
        self.read = read or functools.partial(read_sample, spec)
        self.labels = np.asarray(spec.labels, dtype=np.int32)
        n = max(1, spec.loader.reads_in_flight)
        self.ahead = -(-n // spec.pipe_batch)       # steps read ahead: enough to keep n reads queued
        self.recent = deque(maxlen=max(1, spec.loader.prefetch) + 2)   # steps handed to DALI, newest last
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="rotnet-read")
        # wait=False: a forked child that collects this object has no pool threads to join
        self._close = weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        self._pending = {}                          # iteration -> futures of its samples' bytes, in order
        self._orders = {}                           # epoch -> this rank's indices (int64 array)

    def indices(self, i: int) -> np.ndarray:
        """Sample indices of iteration i, in batch order."""
        epoch, step = divmod(i, self.steps)
        if epoch not in self._orders:
            s = self.spec
            self._orders[epoch] = np.asarray(
                rank_indices(len(s.paths), s.pipe_batch, s.rank, s.world_size, s.train, s.seed, epoch),
                dtype=np.int64)
        p = self.spec.pipe_batch
        return self._orders[epoch][step * p:(step + 1) * p]

    def __call__(self, i: int):
        idx = self.indices(i)
        data = self.take(i)
        # Inside a batch DALI's decoder can crash the process on a JPEG cut short, and fails on a PNG cut
        # short without naming it: the step is refused before DALI sees it, every bad file of it named.
        if any(truncated(b) for b in data):
            bad = [(self.spec.paths[j], why) for j, b in zip(idx.tolist(), data) if (why := by_rule(b))]
            raise BadImageError(name_bad_files(self.spec, bad, "Refused before decoding: DALI can crash on "
                                                               "such files, or fail without naming them."))
        self.recent.append(idx)
        return [np.frombuffer(b, dtype=np.uint8) for b in data], self.labels[idx].reshape(-1, 1)

    def take(self, i: int) -> list[bytes]:
        """The bytes of iteration i's samples (waiting for them), after queueing the next steps' reads."""
        for k in [k for k in self._pending if k < i]:   # behind us (never, in a forward run): drop
            for f in self._pending.pop(k):
                f.cancel()
        for k in range(i, i + 1 + self.ahead):
            if k not in self._pending:
                self._pending[k] = [self._pool.submit(self.read, int(j)) for j in self.indices(k)]
        for e in [e for e in self._orders if e < i // self.steps]:
            del self._orders[e]
        return [f.result() for f in self._pending.pop(i)]

    def in_flight(self) -> list[int]:
        """Samples of the steps recently handed to DALI: where an image it failed to decode is."""
        return [int(j) for idx in self.recent for j in idx]

    def close(self) -> None:
        """Stop the read threads (queued reads are dropped)."""
        self._close()
