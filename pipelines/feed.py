"""The DALI loader's reader, for image folders and tar shards alike: `Feed`, an `external_source` callback
that keeps `loader.reads_in_flight` reads going per rank.

Iteration i of the pipeline is step i % T of reader epoch i // T (T = the loader's steps per epoch); its
samples are `rank_indices(...)[step*P:(step+1)*P]`, the torch backend's order: every image once per epoch
over all ranks, a global shuffle, equal training steps, validation shards read once with a smaller last
batch and no padding. A function of i alone, so DALI's checkpoint (which records i) resumes it exactly.

On Lustre/GPFS/NFS a read costs milliseconds however small it is, so reading a step's samples one after
another starves the decoder. Here a pool of `reads_in_flight` threads reads the current step's samples and
those of the next steps (enough of them to keep the pool busy) while DALI decodes: a sample is a whole file
(open + read + close) or one `os.pread` of a tar, and both release the GIL. Reads finish in any order; each
step still gets its samples in its own order, because each sample's bytes land in its own slot.

Why threads and not DALI's parallel external_source (worker processes): the reads are I/O, so the GIL is no
limit; processes would copy every batch once more through shared memory, each hold its own descriptors, and
fork a process whose DALI and CUDA state must not be touched; here a failed read is raised in the caller's
process, naming its file, at the step it belongs to.
"""
from __future__ import annotations

import functools
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines.contract import rank_indices
from pipelines.listing import BadImageError


def read_sample(spec, j: int) -> bytes:
    """The encoded bytes of sample j: its whole file (folders) or its tar member (shards); BadImageError
    naming it when it cannot be read or is empty."""
    name = spec.paths[j]
    try:
        if spec.shards is not None:
            data = spec.shards.read(j)
        else:
            with open(name, "rb", buffering=0) as f:
                data = f.read()
    except OSError as e:
        raise BadImageError(f"cannot read {name!r}: {e.strerror or e}") from e
    if not data:
        raise BadImageError(f"{name!r} is empty (0 bytes); remove it or list without it "
                            "(`python -m pipelines.scan SPLIT_DIR --out LIST`)")
    return data


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
        data = [np.frombuffer(b, dtype=np.uint8) for b in self.take(i)]
        self.recent.append(idx)
        return data, self.labels[idx].reshape(-1, 1)

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
