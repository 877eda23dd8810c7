"""data.resident=True: decode the split once, keep uint8 images in memory, augment per batch.

For small-image sets (CIFAR: 50,000 JPEGs of 32x32, 150 MB decoded), re-decoding every epoch
costs more than the model step. Images go to GPU memory when `device` is cuda, RAM otherwise.
Storage: one uint8 (M, H, W, C) tensor when all images share a size (CIFAR), else a list.
Eval recipes are deterministic, so their crops are computed once at load time (always stacked).

Per batch (tensor ops on `device`): cifar train = zero-pad 4 + random crop + flip as ONE
gather (flip folded into the column index); imagenet train = per-image random-resized-crop
+ flip; then rotations (torch.rot90, exact) and optional normalisation. Sharding, step counts,
epochs and state follow the torch backend (`EpochSampler`); augmentation randomness is drawn
on the CPU from (seed, epoch, step, rank), so resumed runs replay the same batches.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from pipelines.normalize import prepare_batch
from pipelines.rotations import rotate_hwc, rotation_labels, stack_rotations
from pipelines.torch_backend import EpochLoader, EpochSampler, decode_rgb, rrc_params


def _load_one(path: str, data, train: bool) -> torch.Tensor:
    """Decode to uint8 (H, W, C); eval recipes are cropped now (they are deterministic)."""
    img = decode_rgb(path)
    if not train:
        crop = data.crop_size
        if data.recipe == "imagenet":
            img = TF.resize(img, [data.resize_size], antialias=True)
        img = TF.center_crop(img, [crop, crop])
    return img.permute(1, 2, 0).contiguous()


class ResidentLoader(EpochLoader):
    """Same contract as the DALI/torch loaders; `backend` is 'torch' (torch ops), `resident` True."""

    backend = "torch"
    resident = True
    _state_tag = {"resident": True}

    def __init__(self, *, paths, labels, data, rank, world, rotations, normalize, kind, mode, k,
                 batch_size, pipe_batch, train, device, classes, num_samples, seed):
        self.kind, self.mode, self.k, self.batch_size = kind, mode, k, batch_size
        self.device, self.classes, self.num_samples = torch.device(device), classes, num_samples
        self._data, self._rot, self._normalize, self._train = data, rotations, normalize, train
        self._p, self._rank, self._world, self._seed = pipe_batch, rank, world, seed
        self.sampler = EpochSampler(len(paths), pipe_batch, rank, world, train, seed)
        if train and not self.sampler.indices():
            raise ValueError(f"{len(paths) // world} images per rank < one batch of {pipe_batch}")
        with ThreadPoolExecutor(max(1, data.num_threads)) as ex:  # decode ops release the GIL
            imgs = list(ex.map(lambda p: _load_one(p, data, train), paths))
        self.labels = torch.tensor(labels, dtype=torch.int64, device=self.device)
        if all(im.shape == imgs[0].shape for im in imgs):
            self.images = torch.stack(imgs).to(self.device)  # (M, H, W, C)
        else:
            self.images = [im.to(self.device) for im in imgs]
        self._step = 0
        # CPU: build batches one ahead in a helper thread with ONE intra-op thread. The ops are
        # small; OpenMP teams on shared/busy cores made them 15x slower (measured: 424 ms vs
        # 27 ms per 128-image CIFAR batch while other jobs loaded the 2 cores). The setting is
        # per thread, so the trainer's own torch threads are untouched.
        self._helper = None if self.device.type == "cuda" else ThreadPoolExecutor(
            1, initializer=torch.set_num_threads, initargs=(1,))

    def __iter__(self):
        self._roll_epoch()
        order, steps = self.sampler.indices(), len(self)

        def make(step):
            idx = torch.tensor(order[step * self._p:(step + 1) * self._p], dtype=torch.int64)
            g = torch.Generator().manual_seed(
                ((self._seed * 1_000_003 + self.sampler.epoch) * 100_003 + step) * 1_009 + self._rank)
            return self._batch(idx, g)  # a function of (seed, epoch, step, rank) only

        if self._helper is None:
            while self._step < steps:
                batch = make(self._step)
                self._step += 1
                yield batch
            return
        ahead = self._helper.submit(make, self._step)
        while self._step < steps:
            batch = ahead.result()
            if self._step + 1 < steps:
                ahead = self._helper.submit(make, self._step + 1)
            self._step += 1
            yield batch

    # ------------------------------------------------------------ augmentation
    def _crops(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 (P, S, S, C) crops of images `idx` per the recipe, flips included."""
        n, s, data = len(idx), self._data.crop_size, self._data
        if not self._train:
            return self.images[idx.to(self.device)] if torch.is_tensor(self.images) \
                else torch.stack([self.images[i] for i in idx.tolist()])
        flip = torch.rand(n, generator=g) < 0.5
        if data.recipe == "cifar" and torch.is_tensor(self.images):
            x = self.images[idx.to(self.device)]
            pad = F.pad(x, (0, 0, 4, 4, 4, 4))            # (P, H+8, W+8, C), zeros
            span_y, span_x = pad.shape[1] - s, pad.shape[2] - s
            oy = torch.randint(0, span_y + 1, (n,), generator=g)
            ox = torch.randint(0, span_x + 1, (n,), generator=g)
            ar = torch.arange(s)
            rows = oy[:, None] + ar                        # (P, S)
            cols = torch.where(flip[:, None], ox[:, None] + s - 1 - ar, ox[:, None] + ar)
            dev = self.device
            return pad[torch.arange(n, device=dev)[:, None, None], rows.to(dev)[:, :, None],
                       cols.to(dev)[:, None, :]]
        out = []
        for j, i in enumerate(idx.tolist()):
            img = self.images[i].permute(2, 0, 1)         # (C, H, W) view
            if data.recipe == "imagenet":
                top, left, ch, cw = rrc_params(img.shape[1], img.shape[2], data.min_scale, g)
                img = img[:, top:top + ch, left:left + cw]
                if img.is_cuda:  # uint8 antialiased resize is a CPU kernel: do it in float on GPU
                    img = TF.resize(img.float(), [s, s], antialias=True).round_().clamp_(0, 255).byte()
                else:
                    img = TF.resize(img, [s, s], antialias=True)
            else:  # cifar recipe on ragged images
                img = TF.center_crop(img, [s + 8, s + 8])
                dy, dx = torch.randint(0, 9, (2,), generator=g).tolist()
                img = img[:, dy:dy + s, dx:dx + s]
            if flip[j]:
                img = img.flip(-1)
            out.append(img.permute(1, 2, 0))
        return torch.stack(out)

    def _batch(self, idx: torch.Tensor, g: torch.Generator):
        x = self._crops(idx, g)
        if self.kind == "class":
            y = self.labels[idx.to(self.device)]
        elif self.mode == "all":
            n = x.shape[0]
            x = stack_rotations(x, self._rot).reshape((n * self.k,) + tuple(x.shape[1:]))
            y = rotation_labels(self.k, n, device=self.device)
        else:
            r = torch.randint(0, self.k, (x.shape[0],), generator=g)
            out = torch.empty_like(x)
            for j, a in enumerate(self._rot):
                sel = (r == j).nonzero().flatten().to(self.device)
                if len(sel):
                    out[sel] = rotate_hwc(x[sel], a)
            x, y = out, r.to(self.device)
        if self._normalize:
            x = prepare_batch(x, self._data, channels_last=False).half()
        return x, y
