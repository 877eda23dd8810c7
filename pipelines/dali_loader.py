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
"""
from __future__ import annotations

import math
import re

import torch

from pipelines.listing import BadImageError
from pipelines.rotations import rotation_labels


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """DALI TensorList (uniform shape) -> new torch tensor on `device` (a copy: DALI reuses buffers)."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = tl.as_tensor()  # dense (B, ...) view; shapes are uniform (square crops)
    shape = tuple(t.shape())
    dtype = to_torch_type[t.dtype]
    if isinstance(tl, TensorListGPU):  # labels stay CPU TensorLists even in a GPU pipeline
        out = torch.empty(shape, dtype=dtype, device=device)
        # the copy is ordered on torch's current stream, so later torch work sees the data
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
    else:
        out = torch.empty(shape, dtype=dtype)
        feed_ndarray(t, out)
        if device.type != "cpu":
            out = out.to(device, non_blocking=True)
    return out


class DaliLoader:
    """Iterable of (images, labels); see pipelines/__init__.py for the contract."""

    backend = "dali"

    def __init__(self, *, make_pipe, kind: str, mode: str, k: int, batch_size: int,
                 pipe_batch: int, shard_sizes: list[int], rank: int, train: bool,
                 device: torch.device, classes: list[str], num_samples: int, paths: list[str],
                 seed: int, finisher=None, normalize_host=None):
        self._make_pipe = make_pipe          # checkpoint(str|None) -> built Pipeline
        self._finisher = finisher            # HostFinisher: CPU "host" stage graphs only
        self._normalize_host = normalize_host  # uint8 batch -> float16 (B, C, H, W), or None
        self.kind, self.mode, self.k = kind, mode, k
        self.batch_size = batch_size         # originals per step (N)
        self._p = pipe_batch                 # samples per pipeline batch (N, or K*N for one_random)
        self._shard = shard_sizes[rank]
        self._reader_batches = math.ceil(max(shard_sizes) / self._p)
        self.train = train
        self.device = torch.device(device)
        self.classes = classes
        self.num_samples = num_samples       # original images per epoch, all ranks
        self._paths = paths                  # this loader's files (for naming bad ones)
        self._seed, self._rank, self._world = seed, rank, len(shard_sizes)
        if train:
            self._steps = min(shard_sizes) // self._p
            if self._steps == 0:
                raise ValueError(f"{min(shard_sizes)} images per rank < one batch of {self._p}: "
                                 "lower the batch size or use more data")
        else:
            self._steps = math.ceil(self._shard / self._p)
        self._pipe = None
        self._checkpoint = None              # restored checkpoint, used when the pipe is built
        self._epoch = 0                      # epoch the current/next iteration belongs to
        self._batch = 0                      # pipeline batches of _epoch already run

    def __len__(self) -> int:
        return self._steps

    # ------------------------------------------------------------ epochs and state
    def _pipeline(self):
        if self._pipe is None:
            self._pipe = self._make_pipe(self._checkpoint)
        return self._pipe

    def _finish_epoch(self) -> None:
        """Run the rest of the current reader epoch (discarded) so the next starts aligned."""
        while 0 < self._batch < self._reader_batches:
            self._run()
            self._batch += 1
        if self._batch:
            self._epoch += 1
            self._batch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (no-op when it is the current, e.g. resumed mid-epoch, one)."""
        if epoch != self._epoch:
            self._finish_epoch()
            self._epoch = epoch

    def state_dict(self) -> dict:
        ckpt = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {"backend": "dali", "kind": self.kind, "epoch": self._epoch, "batch": self._batch,
                "dali_checkpoint": ckpt or "", "seed": self._seed, "world_size": self._world,
                "rank": self._rank, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("backend") != "dali":
            raise ValueError(f"loader state is from backend {state.get('backend')!r}, not 'dali'")
        mine = {"world_size": self._world, "num_samples": self.num_samples, "kind": self.kind}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"loader state {key}={state.get(key)!r} does not match this run ({value!r})")
        self._checkpoint = state["dali_checkpoint"] or None
        self._pipe = None                    # rebuilt from the checkpoint on next use
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    # ------------------------------------------------------------ iteration
    def _run(self):
        try:
            return self._pipeline().run()
        except RuntimeError as e:
            self._pipe = None                # DALI: "pipeline object is no longer valid"
            raise BadImageError(_explain(str(e), self._paths)) from e

    def __iter__(self):
        if self._batch >= self._steps:       # previous epoch done: move on
            self._finish_epoch()
        while self._batch < self._steps:
            outs = self._run()
            b = self._batch
            self._batch += 1
            valid = min(self._p, self._shard - b * self._p)
            yield self._convert(*outs, valid=valid)
        self._finish_epoch_rest()

    def _finish_epoch_rest(self) -> None:
        # Drain the training epoch's tail now (not at the next __iter__), so a checkpoint
        # taken after the loop points at the next epoch's start.
        while self._batch < self._reader_batches:
            self._run()
            self._batch += 1

    def _convert(self, *outs, valid: int):
        if self._finisher is not None:
            return self._convert_host(*outs, valid=valid)
        images, labels = outs
        x = _to_torch(images, self.device)[:valid]
        if self.mode == "all":
            x = x.reshape((valid * self.k,) + tuple(x.shape[2:]))  # (N, K, ...) -> (K*N, ...)
            y = rotation_labels(self.k, valid, device=self.device)
        else:
            y = _to_torch(labels, self.device)[:valid].reshape(-1).long()
        return x, y

    def _convert_host(self, crops, labels, flips, rot, valid: int):
        """CPU stage "host": finish DALI's crops with torch ops (see pipelines.host_post)."""
        import numpy as np

        # Zero-copy views of DALI's buffers: valid until the next run(), and used up before it.
        views = [torch.from_numpy(np.asarray(crops[i])) for i in range(valid)]
        f = np.asarray(flips.as_tensor()).reshape(-1)[:valid].tolist()
        r = np.asarray(rot.as_tensor()).reshape(-1)[:valid].tolist()
        x = self._finisher(views, f, r)
        if self.mode == "all":
            x = x.reshape((valid * self.k,) + tuple(x.shape[2:]))  # (N, K, ...) -> (K*N, ...)
            y = rotation_labels(self.k, valid)
        elif self.mode == "one_random":
            y = torch.tensor(r, dtype=torch.int64)
        else:
            y = torch.from_numpy(np.asarray(labels.as_tensor()).reshape(-1)[:valid].astype(np.int64))
        if self._normalize_host is not None:
            x = self._normalize_host(x)
        return x.to(self.device), y.to(self.device)


# DALI names the file as the reader knows it: "Failed to decode sample #6 : CLASS/IMG.JPEG",
# relative to file_root (this loader passes relative paths), so it is matched back to our list.
_PATH_RE = re.compile(r"sample #\d+\s*:\s*([^\n\r]+?\.(?:jpe?g|png|ppm|bmp|pgm|tiff?|webp))\s*$",
                      re.IGNORECASE | re.MULTILINE)


def _explain(message: str, paths: list[str]) -> str:
    """A clear message naming the bad file: from DALI's error when it names one, else by a
    header check of this loader's files."""
    hit = _PATH_RE.search(message)
    bad = []
    if hit:
        rel = hit.group(1).strip()
        bad = [p for p in paths if p.endswith("/" + rel) or p == rel] or [rel]
    if not bad:
        from pipelines.scan import bad_headers

        bad = bad_headers(paths)[:10]
    first = message.strip().splitlines()[-1] if message.strip() else ""
    where = ("bad image file(s): " + ", ".join(repr(p) for p in bad)) if bad \
        else "a file could not be decoded (DALI did not name it)"
    return (f"{where}. Run `python -m pipelines.scan SPLIT_DIR --out LIST` and set data.file_list "
            f"to the list it writes. DALI said: {first}")
