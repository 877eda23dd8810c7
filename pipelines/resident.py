"""loader.resident=True: decode the split once, keep uint8 images on `device`, augment per batch.

For small images (CIFAR) re-decoding costs more than the model step. Eval crops are precomputed;
sharding, steps, state and randomness are the torch backend's.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from pipelines.contract import LoaderSpec
from pipelines.recipe import crop_batch, make_batch
from pipelines.rotations import to_device
from pipelines.torch_backend import SampledLoader, decode_sample


class ResidentLoader(SampledLoader):
    """Images: one uint8 (M, H, W, C) tensor when sizes agree, else a list."""

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        data, dev = spec.data, spec.device

        def load(i):  # uint8 (H, W, C); eval crops now
            img = decode_sample(spec, i)
            return img if spec.train else crop_batch([img], data, False)[0]

        with ThreadPoolExecutor(max(1, spec.loader.num_threads)) as ex:  # decode ops release the GIL
            imgs = list(ex.map(load, range(len(spec.paths))))
        self.labels = torch.tensor(spec.labels, dtype=torch.int64, device=dev)
        if all(im.shape == imgs[0].shape for im in imgs):
            self.images = torch.stack(imgs).to(dev)  # (M, H, W, C)
        else:
            self.images = [im.to(dev) for im in imgs]
        # CPU: build batches one ahead in a helper thread with ONE intra-op thread (small ops:
        # OpenMP teams on busy cores are far slower); per thread, so the trainer's are untouched.
        self._helper = None if dev.type == "cuda" else ThreadPoolExecutor(
            1, initializer=torch.set_num_threads, initargs=(1,))

    def _make(self, item):
        key, idx = item
        i = to_device(torch.tensor(idx, dtype=torch.int64), self.spec.device)
        images = self.images[i] if torch.is_tensor(self.images) else [self.images[j] for j in idx]
        return make_batch(self.spec, key, images, self.labels[i], cropped=not self.spec.train)

    def _run(self):
        if self._helper is None:
            yield from map(self._make, self.sampler)
            return
        ahead = []   # the batch being yielded and the next one, in the works
        for item in self.sampler:
            ahead.append(self._helper.submit(self._make, item))
            if len(ahead) == 2:
                yield ahead.pop(0).result()
        for f in ahead:
            yield f.result()
