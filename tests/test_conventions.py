"""The habits users bring from mmsegmentation: dataset roots one level off, Mapillary
versions found from the folder, mmseg's Mapillary class tables, argparse-like multi-value
options, messages that keep their brackets, and priors that describe the stored labels."""

import csv
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from softprep.build import BuildOptions, build
from softprep.cli import MULTI_VALUE, app
from softprep.datasets import detect_version, discover
from softprep.manifest import load_manifest
from softprep.sample import write_sample
from softprep.store import SoftStore
from softprep.terminal import expand_multi_value, tagged
from tests.conftest import FACTS, FIXTURES, needs_facts, needs_fixtures

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, expand_multi_value([str(a) for a in args], MULTI_VALUE, app))
    result.text = " ".join(result.output.split())
    return result


def test_ade20k_root_may_be_mmsegs_data_root(samples, caplog):
    inner = samples["ade20k"] / "ADEChallengeData2016"
    ade = load_manifest("ade20k")
    with caplog.at_level(logging.WARNING, logger="softprep"):
        pairs, problems = discover(ade, inner)
    assert len(pairs) == 6 and not problems
    assert f"using {samples['ade20k']} as the ade20k root" in caplog.text
    r = run("scan", "ade20k", "--root", inner)
    assert r.exit_code == 0, r.text
    assert f"note: using {samples['ade20k']}" in r.text


def test_root_one_level_too_high(samples, tmp_path):
    shutil.copytree(samples["cityscapes"], tmp_path / "data/cityscapes")
    pairs, _ = discover(load_manifest("cityscapes"), tmp_path / "data")
    assert len(pairs) == 6 and pairs[0].image.is_relative_to(tmp_path / "data/cityscapes")


@pytest.mark.parametrize("version", ["v1.1", "v2.0"])
def test_mapillary_version_detected_from_the_folder(tmp_path, version, caplog):
    root = tmp_path / "vistas"
    write_sample(load_manifest("mapillary", version), root, {"train": 2, "val": 1})
    with caplog.at_level(logging.WARNING, logger="softprep"):
        assert detect_version("mapillary", root) == version
    assert f"mapillary {version} detected" in caplog.text
    r = run("scan", "mapillary", "--root", root)
    assert r.exit_code == 0 and f"mapillary {version} detected" in r.text, r.text


def test_several_mapillary_versions_use_v12_and_say_so(tmp_path, caplog):
    root = tmp_path / "vistas"
    for version in ("v1.2", "v2.0"):
        write_sample(load_manifest("mapillary", version), root, {"train": 2})
    with caplog.at_level(logging.WARNING, logger="softprep"):
        assert detect_version("mapillary", root) == "v1.2"
    assert "versions v1.2, v2.0; using v1.2 (choose with --version)" in caplog.text


def test_missing_labels_name_the_version_that_fits(samples):
    _, problems = discover(load_manifest("mapillary", "v1.2"), samples["mapillary-v2.0"])
    root = samples["mapillary-v2.0"]
    assert len(problems) == 2
    for p, folder in zip(problems, ("training", "validation")):
        n = len(list((root / folder / "images").glob("*.jpg")))  # what the split leaves out
        assert n and p.message.endswith(
            f"label folder missing for its {n} images (the v2.0 layout is here: use --version v2.0)"
        )


@pytest.mark.parametrize("version,classes", [("v1.2", 66), ("v2.0", 124), ("v1.1", 66)])
def test_mapillary_unlabeled_variant_matches_mmseg_tables(version, classes):
    m = load_manifest("mapillary", version, "unlabeled")
    assert m.num_classes == classes and m.classes[-1].name == "Unlabeled"
    assert m.ignore_index not in m.label_values.values()  # nothing is void any more
    if version == "v2.0" and FACTS.is_dir():
        with open(FACTS / "mapillary_v2.0_classes_mmseg.tsv") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert [r["readable"] for r in rows] == m.class_names
        assert [[int(r[c]) for c in "rgb"] for r in rows] == [list(c.color) for c in m.classes]


@needs_fixtures
def test_unlabeled_variant_builds_the_real_mapillary_files(tmp_path):
    m = load_manifest("mapillary", "v1.2", "unlabeled")
    url = str(tmp_path / "m.zarr")
    build(m, FIXTURES / "mapillary", url, BuildOptions(scales=(0.25,), short_side=64))
    counts = SoftStore(url).full_counts().sum(0)
    assert counts[-1] == 0  # no void left: Unlabeled pixels are class 65
    assert SoftStore(url).num_classes == 66


@needs_facts
def test_mmseg_v12_class_names(tmp_path):
    with open(FACTS / "mapillary_v1.2_labels.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    readable = [r[2] for r in rows[1:]]
    assert readable[-1] == "Unlabeled" and len(readable) == 66
    assert load_manifest("mapillary", "v1.2", "unlabeled").classes[-1].name == readable[-1]


def test_positional_after_a_multi_value_option_stays_positional(samples, tmp_path):
    argv = ["build", "--scales", "1/8", "1/4", "cityscapes", "--root", "cs"]
    assert expand_multi_value(argv, MULTI_VALUE, app) == [
        "build", "--scales", "1/8", "--scales", "1/4", "--root", "cs", "cityscapes",
    ]  # fmt: skip
    r = run(
        "build", "--scales", "1/8", "1/4", "cityscapes", "--root", samples["cityscapes"],
        "--out", tmp_path / "s.zarr",
    )  # fmt: skip
    assert r.exit_code == 0, r.text
    assert SoftStore(str(tmp_path / "s.zarr")).scales == [0.125, 0.25]


def test_single_value_option_given_twice_is_refused():
    with pytest.raises(ValueError, match="--split takes one value"):
        expand_multi_value(["priors", "--split", "train", "--split", "val"], MULTI_VALUE, app)
    with pytest.raises(ValueError, match="--split takes one value"):
        expand_multi_value(["priors", "--split", "train", "val"], MULTI_VALUE, app)
    repeated = expand_multi_value(
        ["build", "x", "--scales", "1/8", "--scales", "1/4"], MULTI_VALUE, app
    )
    assert repeated.count("--scales") == 2  # a list option extends


def test_messages_keep_their_brackets():
    console = Console(record=True, width=200)
    console.print(tagged("error", "red", "the dask backend needs pip install 'softprep[dask]'"))
    assert "pip install 'softprep[dask]'" in console.export_text()


def test_progress_rate_counts_from_the_first_image(samples, tmp_path):
    calls = []
    summary = build(
        load_manifest("cityscapes"),
        samples["cityscapes"],
        str(tmp_path / "s.zarr"),
        BuildOptions(scales=(0.125,)),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)  # the first call starts the clock
    assert summary.images_per_second == pytest.approx(summary.built / summary.image_seconds)
    assert summary.image_seconds <= summary.seconds


def test_progress_bar_names_each_stage_and_counts_its_rate_afresh(monkeypatch):
    """A build's bar says "checking changed files" while it rereads copied files, then
    "building"; the second stage's rate is not diluted by the first's time."""
    import softprep.terminal as terminal

    recorded = Console(record=True, force_terminal=True, width=120)
    monkeypatch.setattr(terminal, "console", recorded)
    clock = iter([0.0, 1.0, 100.0, 102.0])  # the bar's own clock; rich keeps its own
    monkeypatch.setattr(terminal, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    with terminal.progress_bar("building") as bar:
        bar(1, 4, "checking changed files")
        bar(4, 4, "checking changed files")
        bar(0, 6, "building")
        bar(6, 6, "building")
    text = recorded.export_text()  # every render, one after the other
    assert "checking changed files" in text
    assert "6/6 3.00 img/s" in text[text.rindex("building") :]  # 6 images in 2 s, not in 102


@pytest.mark.parametrize("kernel", ["bilinear", "bicubic", "area"])
def test_soft_statistics_are_the_stored_planes_totals(samples, tmp_path, kernel):
    url = str(tmp_path / "s.zarr")
    m = load_manifest("cityscapes")
    build(m, samples["cityscapes"], url, BuildOptions(scales=(0.125, 0.5), kernel=kernel))
    s = SoftStore(url)
    c = s.num_classes
    for scale in s.scales:
        stats = s.stats(scale, "soft")
        for i in range(len(s)):
            index, prob = s.read_soft(scale, i)
            ids = np.where(index == 255, c, index)
            totals = np.bincount(ids.ravel(), prob.ravel() / 255.0, minlength=c + 1)
            mixed = int((prob[1] > 0).sum())  # only these were rounded
            assert np.abs(stats[i] - totals).max() <= mixed / 255 + 1e-6, (scale, i)
