"""Thin iterator over a DALI `rotation_graph` pipeline: epochs, step counts, state, errors.

DALI's own DALIGenericIterator is not used: its step count follows each rank's shard size
(ranks can differ by one step -> DDP hang) and it cannot drop the duplicated padding of a
validation shard. This wrapper runs the pipeline itself:

  reader epoch = R = ceil(max_r S_r / P) pipeline batches on EVERY rank (S_r = shard size,
  P = pipeline batch): DALI pads each shard to the largest one (and to whole batches) by
  repeating its last sample, so a smaller shard can end with a batch of padding only.
  training:   yields T = floor(floor(M / W) / P) full batches on every rank, then runs (and
              discards) the rest of the reader epoch, so every rank takes the same number
              of steps and the next epoch starts at the reader's epoch boundary.
  validation: yields the ceil(S_r / P) batches holding real samples, the last one trimmed:
              every image once over all ranks, no padding, no drops. Step counts can differ
              by one between ranks, so do collectives after the loop (sum, then all_reduce).
Tar shards (spec.shards): no DALI reader; `ShardFeed` hands the graph each step's samples in
the order `rank_indices` gives (the torch backend's), so a reader epoch is exactly the steps
(no padding) and the last validation batch is simply smaller.
"""
from __future__ import annotations

import functools
import io
import math
import os
import re
import tempfile
import weakref

import torch

from pipelines.contract import Loader, LoaderSpec
from pipelines.cpu_finisher import CpuFinisher
from pipelines.dali_graph import external_reader, file_reader, rotation_graph
from pipelines.listing import BadImageError, file_list_lines
from pipelines.recipe import repair_advice
from pipelines.shard_reader import ShardFeed


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
        n, w = len(spec.paths), spec.world_size
        self._reader_batches = self._steps if spec.shards is not None \
            else math.ceil(-(-n // w) / spec.pipe_batch)  # folders: the largest shard, ceil(n / w)
        self._feed = None                    # tar shards: the ShardFeed of the current pipe
        # Files this rank may read (to name a bad one DALI does not name): training reshuffles
        # globally every epoch, so any file.
        self._paths = spec.paths if spec.train else spec.paths[slice(*self._shard)]
        self._pipe = None
        self._checkpoint = None              # restored checkpoint, used when the pipe is built
        self._list_path = None               # folders: the file list DALI reads (`_file_list`)

    def _build_pipe(self):
        s, d, how = self.spec, self.spec.data, self.spec.loader
        if s.shards is not None:
            self._feed = ShardFeed(s, self._steps, depth=max(1, how.prefetch))
            reader = functools.partial(external_reader, self._feed)
        else:
            reader = functools.partial(
                file_reader, file_list=self._file_list(), file_root=s.paths.root, shard_id=s.rank,
                num_shards=s.world_size, train=s.train, reader_seed=s.seed_for("reader"))  # same on all ranks
        pipe = rotation_graph(
            reader=reader, train=s.train, recipe=d.recipe, crop=d.crop_size, resize=d.resize_size,
            min_scale=d.min_scale,
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

    def _file_list(self) -> str:
        """This loader's files as a DALI file list (`relative/path label` lines), written once to a
        temporary file that is removed with the loader; a rebuilt pipe reads it again."""
        if self._list_path is None:
            paths, labels = self.spec.paths, self.spec.labels
            fd, self._list_path = tempfile.mkstemp(prefix="rotnet-dali-", suffix=".txt")
            weakref.finalize(self, os.remove, self._list_path)
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.writelines(file_list_lines((paths.relative(i) for i in range(len(paths))), labels))
        return self._list_path

    # ------------------------------------------------------------ state hooks
    def _end_epoch(self) -> None:
        """Run the rest of a started reader epoch (discarded), so the next epoch starts on its
        boundary. Also right after the loop, so that a checkpoint taken then points there."""
        while 0 < self.step < self._reader_batches:
            self._run()
            self.step += 1

    def _extra_state(self) -> dict:
        ckpt = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {"dali_checkpoint": ckpt or "", "rank": self.spec.rank}

    def _restore(self, state: dict) -> None:
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
        """A clear message naming the bad file: from DALI's error when it names one, else by checking
        this loader's files' headers (folders) or fully decoding the batches in flight (shards)."""
        if self._feed is not None:
            from pipelines.scan import check_image

            names = self.spec.paths
            read = self.spec.shards.read
            bad = [names[j] for j in self._feed.in_flight() if check_image(io.BytesIO(read(j)))]
        else:
            bad = _named_or_bad_headers(message, self._paths)
        first = message.strip().splitlines()[-1] if message.strip() else ""
        where = ("bad image file(s): " + ", ".join(repr(p) for p in bad[:10])) if bad \
            else "a file could not be decoded (DALI did not name it)"
        return f"{where}. {repair_advice(self._feed is not None)} DALI said: {first}"

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


# DALI names the file as the reader knows it: "Failed to decode sample #6 : CLASS/IMG.JPEG",
# relative to file_root (this loader passes relative paths), so it is matched back to our list.
_PATH_RE = re.compile(r"sample #\d+\s*:\s*([^\n\r]+?\.(?:jpe?g|png|ppm|bmp|pgm|tiff?|webp))\s*$",
                      re.IGNORECASE | re.MULTILINE)


def _named_or_bad_headers(message: str, paths: list[str]) -> list[str]:
    """The file DALI's error names, matched back to our list, else the files with a non-image header."""
    hit = _PATH_RE.search(message)
    if hit:
        rel = hit.group(1).strip()
        return [p for p in paths if p.endswith("/" + rel) or p == rel] or [rel]
    from pipelines.scan import bad_headers

    return bad_headers(paths)[:10]
