"""softprep priors: D for soft labels ~0, nearest neighbour against an independent count."""

import csv
import json

import numpy as np
import pytest

from softprep.build import BuildOptions, build
from softprep.datasets import decode_label, discover
from softprep.manifest import load_manifest
from softprep.priors import from_dataset, from_store
from softprep.store import SoftStore, StoreError


@pytest.fixture(scope="module")
def store(samples, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("priors") / "cs.zarr")
    opts = BuildOptions(scales=(0.125, 0.25, 0.5), stats_for=("area", "bilinear-noaa"))
    build(load_manifest("cityscapes"), samples["cityscapes"], url, opts)
    return SoftStore(url)


def test_soft_and_area_priors_conserved(store):
    report = from_store(store, ["nn", "nn-floor", "area", "bilinear-noaa"], "train")
    for level in report.levels:
        assert np.abs(report.discrepancy(level, "soft")).max() < 1e-4
        assert np.abs(report.discrepancy(level, "area")).max() < 1e-12  # integer factors
        assert np.abs(report.discrepancy(level, "nn")).max() > 1e-4  # nearest loses classes
    # 2x2 averaging at 1/2 sees every pixel exactly once
    assert np.abs(report.discrepancy("1/2", "bilinear-noaa")).max() < 1e-15


def test_nearest_neighbour_against_independent_count(store, samples):
    m = load_manifest("cityscapes")
    pairs, _ = discover(m, samples["cityscapes"], ["train"])
    for f, level in [(8, "1/8"), (4, "1/4"), (2, "1/2")]:
        centre = np.zeros(20)
        floor = np.zeros(20)
        full = np.zeros(20)
        for p in pairs:
            lab = decode_label(p.label, m)
            for acc, sub in [
                (centre, lab[f // 2 :: f, f // 2 :: f]),
                (floor, lab[::f, ::f]),
                (full, lab),
            ]:
                h = np.bincount(sub.ravel(), minlength=256)
                acc += np.r_[h[:19], h[255]]
        report = from_store(store, ["nn", "nn-floor"], "train")
        share = lambda v: v[:19] / v[:19].sum()  # noqa: E731
        np.testing.assert_allclose(report.original, share(full))
        np.testing.assert_allclose(report.priors[level]["nn"], share(centre))
        np.testing.assert_allclose(report.priors[level]["nn-floor"], share(floor))


def test_dataset_route_equals_store_route(store, samples):
    m = load_manifest("cityscapes")
    direct = from_dataset(
        m,
        samples["cityscapes"],
        BuildOptions(scales=(0.125, 0.25, 0.5), stats_for=("area",)),
        ["nn", "area"],
        "all",
    )
    stored = from_store(store, ["nn", "area"], "all")
    assert direct.images == stored.images == 6
    for level in stored.levels:
        for s in ("soft", "nn", "area"):
            np.testing.assert_allclose(direct.priors[level][s], stored.priors[level][s], rtol=1e-12)


def test_csv_json_plot_match_report(store, tmp_path):
    report = from_store(store, ["nn"], "all")
    report.write_csv(tmp_path / "d.csv")
    report.write_json(tmp_path / "d.json")
    report.plot(tmp_path / "d.png")
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    data = json.loads((tmp_path / "d.json").read_text())
    assert len(rows) == len(data["rows"]) == 3 * 2 * 19
    for row, jrow in zip(rows, data["rows"]):
        d = report.discrepancy(row["level"], row["strategy"])[int(row["class_id"])]
        assert float(row["D"]) == pytest.approx(d, abs=1e-15) and jrow["D"] == pytest.approx(
            d, abs=1e-15
        )
    assert (tmp_path / "d.png").stat().st_size > 10_000


def test_bad_input(store, tmp_path):
    with pytest.raises(StoreError, match="no statistics for 'bicubic'"):
        from_store(store, ["bicubic"])
    with pytest.raises(StoreError, match="no split 'test'"):
        from_store(store, ["nn"], "test")
    with pytest.raises(StoreError, match="no level 1/16"):
        store.level("1/16")
    with pytest.raises(ValueError, match="unknown strategy 'lanczos'"):
        BuildOptions(scales=(0.5,), stats_for=("lanczos",))
    with pytest.raises(StoreError, match="no zarr store"):
        SoftStore(str(tmp_path / "missing.zarr"))
