"""``softtrain bench-loader``: crops/s and MB/s of a training loader."""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Sampler

from softtrain.config import parse_crop
from softtrain.data import CropDataset


class RepeatSampler(Sampler):
    """Indices 0..n-1 repeated up to ``total`` items (more samples than the split holds)."""

    def __init__(self, n: int, total: int):
        self.n, self.total = n, total

    def __iter__(self):
        return (i % self.n for i in range(self.total))

    def __len__(self) -> int:
        return self.total


def _tensor_bytes(batch) -> int:
    """Bytes of the tensors a batch holds (a dict of stacked tensors, or a list of samples)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, dict):
        return sum(_tensor_bytes(v) for v in batch.values())
    if isinstance(batch, list | tuple):
        return sum(_tensor_bytes(v) for v in batch)
    return 0


def time_loader(dataset, workers: int, batch_size: int, batches: int, collate_fn=None) -> dict:
    """Time ``batches`` batches of any map-style dataset after one warm-up batch per worker
    (workers started, stores opened). ``collate_fn``: None batches samples as ``softtrain
    fit`` does (torch's default: one stacked tensor per key, in the worker); ``list`` keeps
    them apart, as mmsegmentation's ``pseudo_collate`` does for crops of different sizes.
    Returns crops/s, crops/s per worker and MB/s of the tensors the batches hold."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        sampler=RepeatSampler(len(dataset), batch_size * (batches + max(1, workers))),
        collate_fn=collate_fn,
    )
    it = iter(loader)
    for _ in range(max(1, workers)):
        next(it)
    start, nbytes = time.perf_counter(), 0
    for _ in range(batches):
        nbytes += _tensor_bytes(next(it))
    seconds = time.perf_counter() - start
    crops = batches * batch_size  # every batch is full: the sampler yields whole batches
    return {
        "crops_per_s": crops / seconds,
        "crops_per_s_per_worker": crops / seconds / max(1, workers),
        "mb_per_s": nbytes / seconds / 1e6,
        "seconds": seconds,
    }


def bench_loader(url: str, crop: str, workers: int, batch_size: int = 8, batches: int = 30) -> dict:
    """``time_loader`` on the training crops of a store, with ``note``: the dataset's
    ``padding_note`` (None when crops are mostly image)."""
    crops = CropDataset(url, parse_crop(crop), "train")
    return time_loader(crops, workers, batch_size, batches) | {"note": crops.padding_note()}
