"""``softprep verify``: check that a store is complete and every stored pixel is valid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from softprep.manifest import VOID
from softprep.planes import TOTAL
from softprep.resample import KERNELS
from softprep.store import SoftStore, StoreError, level_name, scale_label
from softprep.writer import litter, remove_litter, writer_lock


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # left out by --on-error skip: not a failure
    damaged: set[int] = field(default_factory=set)  # finished images with bad or missing data
    layout: bool = True  # False: metadata and arrays disagree (a repair cannot fix that)
    notes: list[str] = field(default_factory=list)  # warnings that are not problems (litter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def advice(self, url: str) -> str:
        """What to do about the problems: the command that fixes them."""
        if not self.layout:
            return f"{url}: its metadata is damaged; delete it and build it again"
        if self.damaged:
            return (
                f"{url}: {len(self.damaged)} image(s) have damaged or missing data; rebuild "
                "them: rerun the same 'softprep build ...' command with --repair"
            )
        return f"{url}: the build did not finish; run the same 'softprep build ...' command again"


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


def check_attributes(store: SoftStore) -> list[str]:
    """Problems where the store's metadata disagrees with itself or with its arrays: the
    options block against the build config, levels, planes (K), class count, strategies,
    image count. An empty list means the arrays can be read as the metadata says."""
    meta, config, out = store.meta, store.meta.get("config", {}), []
    for key in ("kernel", "antialias", "k", "scales", "short_side"):
        if key in config and config[key] != meta.get(key):
            out.append(
                f"attribute '{key}' is {meta.get(key)!r} but the build recorded {config[key]!r}"
            )
    if meta.get("kernel") not in KERNELS:
        out.append(f"attribute 'kernel' {meta.get('kernel')!r} is not a known kernel")
    try:
        n, c = len(store), store.num_classes
        levels = set(store.root["levels"].group_keys())
        wanted = {level_name(s) for s in store.scales}
        if levels != wanted:
            out.append(f"levels {sorted(levels)} but attribute 'scales' says {sorted(wanted)}")
        paths = [f"levels/{name}/soft" for name in sorted(levels & wanted)]
        for path in paths:
            planes = store.root[path].shape[1]
            if planes != 2 * store.k - 1:
                out.append(
                    f"{path} holds {planes} planes but attribute 'k' = {store.k} needs {2 * store.k - 1}"
                )
        expect = {"stats/full": (n, c + 1), "images/done": (n,), "images/hw": (n, 2)}
        for name in sorted(levels & wanted):
            for arr in ("soft", "rgb", "hw"):
                expect[f"levels/{name}/{arr}"] = (n,)
            for strategy in meta.get("strategies", []):
                expect[f"levels/{name}/stats/{strategy}"] = (n, c + 1)
        for path, shape in expect.items():
            if path not in store.root:
                out.append(f"{path}: array missing")
            elif store.root[path].shape[: len(shape)] != shape:
                out.append(f"{path}: shape {store.root[path].shape}, expected {shape}")
    except (KeyError, ValueError, FileNotFoundError) as e:
        out.append(f"store layout unreadable ({type(e).__name__}: {e})")
    return out


def _row_sum_problems(row: np.ndarray, pixels: int, what: str) -> list[str]:
    """Class masses of one image must add up to its pixel count (mass is conserved)."""
    if abs(float(row.sum()) - pixels) > 1e-6 * pixels + 1e-6:
        return [f"{what} add up to {float(row.sum()):.6g}, not the {pixels} pixels"]
    return []


def _clean_litter(url: str, report: VerifyReport) -> None:
    """Remove the temporary files an interrupted write left (a note, not a problem: nothing
    reads them); while a build holds the store, or where it cannot be written, only list
    them."""
    found = litter(url)
    if not found:
        return
    try:
        with writer_lock(url):
            remove_litter(url)
    except (StoreError, OSError) as e:
        reason = e if isinstance(e, StoreError) else f"cannot remove them: {e}"
        report.notes.append(
            f"{len(found)} temporary file(s) of an interrupted or running write, e.g. "
            f"{found[0]}, left in place ({reason})"
        )
        return
    report.notes.append(
        f"removed {len(found)} temporary file(s) left by an interrupted write, e.g. {found[0]}"
    )


def verify(store: SoftStore, progress=None) -> VerifyReport:
    """Metadata consistent with the arrays; every image complete (or skipped on purpose,
    listed apart); every finished image's shards present and readable (CRC32C-checked in
    stores that have checksums); soft planes valid; statistics consistent with the sizes
    and, for full-resolution labels, equal to their histogram. Reads the whole store.
    ``damaged`` lists the finished images with a problem (what ``build --repair`` rebuilds);
    temporary files of an interrupted write are removed (a note; see ``_clean_litter``)."""
    report = VerifyReport()
    _clean_litter(store.url, report)
    report.problems += check_attributes(store)
    if report.problems:
        report.layout = False
        return report
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
    finished = np.flatnonzero(done)
    evaluated = np.isin(store.split_of(), store.meta.get("eval_splits", []))
    lost: dict[int, list[str]] = {}
    for path in store.image_arrays():
        wanted = finished[evaluated[finished]] if path == "full/label" else finished
        for i in store.missing_shards(path, wanted, read_indexes=True):
            lost.setdefault(int(i), []).append(path)

    def problem(i: int, problems: list[str]) -> None:
        report.problems.extend(problems)
        if problems:
            report.damaged.add(int(i))

    for i, paths in sorted(lost.items()):
        problem(i, [f"{names[i]}: data missing in {', '.join(paths)}"])
    full_hw = store.root["images/hw"][:]
    counts = store.full_counts()
    c = store.num_classes
    for n, i in enumerate(finished):
        h, w = (int(v) for v in full_hw[i])
        problem(i, _row_sum_problems(counts[i], h * w, f"{names[i]}: full-resolution counts"))
        if evaluated[i] and i not in lost:
            try:
                label = store.array("full/label")[i, :h, :w]
            except Exception as e:  # noqa: BLE001 (damaged chunks raise codec errors of any type)
                problem(i, [f"{names[i]}: full label unreadable ({type(e).__name__}: {e})"])
            else:
                hist = np.bincount(np.where(label == VOID, c, label).ravel(), minlength=c + 1)
                if not np.array_equal(hist, counts[i]):
                    problem(
                        i, [f"{names[i]}: full-resolution counts differ from the stored full label"]
                    )
        for scale in store.scales:
            where = f"{names[i]} at {scale_label(scale)}"
            g = store.level(scale)
            hh, ww = (int(v) for v in g["hw"][i])
            for strategy in store.meta.get("strategies", []):
                problem(
                    i,
                    _row_sum_problems(
                        g[f"stats/{strategy}"][i], hh * ww, f"{where}: '{strategy}' statistics"
                    ),
                )
            if i in lost:
                continue
            try:
                planes = g["soft"][i, :, :hh, :ww]
                g["rgb"][i, :hh, :ww]
            except Exception as e:  # noqa: BLE001 (damaged chunks raise codec errors of any type)
                problem(i, [f"{where}: unreadable ({type(e).__name__}: {e})"])
                continue
            problem(i, [f"{where}: {p}" for p in check_planes(planes, c)])
        report.checked += 1
        if progress:
            progress(n + 1, len(finished))
    return report
