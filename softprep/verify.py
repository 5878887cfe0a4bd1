"""``softprep verify``: check that a store is complete and every stored pixel is valid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from softprep.manifest import VOID
from softprep.quantize import TOTAL
from softprep.store import SoftStore, scale_label


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # left out by --on-error skip: not a failure

    @property
    def ok(self) -> bool:
        return not self.problems


def check_planes(planes: np.ndarray, num_classes: int) -> list[str]:
    """Problems in one image's (2K-1, h, w) store planes: probabilities that do not sum to
    255, class ids outside the class table, slot 0 that is not the largest."""
    k = (planes.shape[0] + 1) // 2
    index, rest = planes[:k], planes[k:].astype(np.int32)
    first = TOTAL - rest.sum(axis=0)
    out = []
    if (first < 0).any():
        out.append(f"{int((first < 0).sum())} pixel(s) whose probabilities exceed 255")
    if (rest > first[None]).any():
        out.append(
            f"{int((rest > first[None]).any(axis=0).sum())} pixel(s) whose slot 0 is not the largest"
        )
    prob = np.concatenate([first[None], rest])
    bad = (prob > 0) & (index >= num_classes) & (index != VOID)
    if bad.any():
        out.append(
            f"class ids {sorted(set(index[bad].tolist()))[:10]} outside 0..{num_classes - 1} and void"
        )
    return out


def verify(store: SoftStore, progress=None) -> VerifyReport:
    """Every image complete (or skipped on purpose, listed apart); for each image and level:
    soft planes valid and readable, colour readable, statistics consistent with the image
    size. Reads the whole store."""
    report = VerifyReport()
    done = store.done()
    names = store.names()
    skipped = {
        s["index"]: f"{s['path']}: {s['error']}"
        for s in store.meta.get("skipped", [])
        if s.get("index") is not None
    }
    for i in np.flatnonzero(~done):
        if i in skipped:
            report.skipped.append(f"{names[i]}: skipped by the build ({skipped[i]})")
        else:
            report.problems.append(f"{names[i]}: not built (incomplete build; run the build again)")
    full_hw = store.root["images/hw"][:]
    counts = store.full_counts()
    for n, i in enumerate(np.flatnonzero(done)):
        h, w = full_hw[i]
        if counts[i].sum() != int(h) * int(w):
            report.problems.append(f"{names[i]}: full-resolution statistics do not match its size")
        for scale in store.scales:
            where = f"{names[i]} at {scale_label(scale)}"
            g = store.level(scale)
            hh, ww = g["hw"][i]
            try:
                planes = g["soft"][i, :, :hh, :ww]
                g["rgb"][i, :hh, :ww]
            except Exception as e:  # noqa: BLE001 (corrupt chunks raise codec errors of any type)
                report.problems.append(f"{where}: unreadable ({type(e).__name__}: {e})")
                continue
            report.problems += [f"{where}: {p}" for p in check_planes(planes, store.num_classes)]
        report.checked += 1
        if progress:
            progress(n + 1, int(done.sum()))
    return report
