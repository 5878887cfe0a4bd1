"""``softtrain bench-loader``: crops/s and MB/s of the training loader on a store."""

from __future__ import annotations

import time

from torch.utils.data import DataLoader

from softtrain.data import CropDataset, parse_crop


def bench_loader(url: str, crop: str, workers: int, batch_size: int = 8, batches: int = 30) -> dict:
    """Time ``batches`` batches after one warm-up batch per worker; returns crops/s,
    crops/s per worker and MB/s of decoded crop data (colour + top-K planes)."""
    data = CropDataset(url, parse_crop(crop), "train")
    loader = DataLoader(
        data,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        sampler=_Cycle(len(data), batch_size * (batches + max(1, workers))),
    )
    it = iter(loader)
    for _ in range(max(1, workers)):
        next(it)
    start, crops, nbytes = time.perf_counter(), 0, 0
    for _ in range(batches):
        b = next(it)
        crops += b["image"].shape[0]
        nbytes += sum(b[k].numel() for k in ("image", "index", "prob"))
    seconds = time.perf_counter() - start
    return {
        "crops_per_s": crops / seconds,
        "crops_per_s_per_worker": crops / seconds / max(1, workers),
        "mb_per_s": nbytes / seconds / 1e6,
        "seconds": seconds,
    }


class _Cycle:
    """Indices 0..n-1 repeated up to ``total`` items (more samples than the split holds)."""

    def __init__(self, n: int, total: int):
        self.n, self.total = n, total

    def __iter__(self):
        return (i % self.n for i in range(self.total))

    def __len__(self) -> int:
        return self.total
