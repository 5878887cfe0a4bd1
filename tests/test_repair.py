"""Damage has a way back and a crash leaves no litter (issue 29, rules 6 and 9): ``softprep
build --repair`` rebuilds exactly the images verify finds damaged, equal to a clean build;
every message about damage names the repair; temporary files of a killed write are removed by
a resume, by verify and by --repair."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from softprep import writer as writer_module
from softprep.build import BuildError, BuildOptions, build
from softprep.manifest import load_manifest
from softprep.store import SoftStore, StoreError
from softprep.verify import verify
from softprep.writer import writer_lock
from softtrain.data import CropDataset, EvalDataset
from tests.conftest import needs_fork
from tests.test_build import assert_same_store
from tests.test_cli import RECORD_POOL, recorded_bar, run

CS = load_manifest("cityscapes")
SCALES = (0.125, 0.25)


def options(per_shard: int) -> BuildOptions:
    return BuildOptions(scales=SCALES, images_per_shard=per_shard)


@pytest.fixture(scope="module")
def clean(samples, tmp_path_factory):
    """{images per shard: a clean build of the Cityscapes sample (4 train, 2 val)}."""
    base = tmp_path_factory.mktemp("clean")
    stores = {}
    for per in (1, 2):
        stores[per] = str(base / f"per{per}.zarr")
        build(CS, samples["cityscapes"], stores[per], options(per))
    return stores


def files_of(url: str) -> dict[str, bytes]:
    """Every file of a local store by relative path, but the root metadata (build id)."""
    root = Path(url)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p != root / "zarr.json"
    }


def copy_of(clean_url: str, tmp_path: Path) -> str:
    url = str(tmp_path / "s.zarr")
    shutil.copytree(clean_url, url)
    return url


def first_of(s: SoftStore, split: str) -> int:
    return int(np.flatnonzero(s.split_of() == split)[0])


def damage(url: str, kind: str) -> tuple[int, str]:
    """Damage one image's data in a store; returns (image index, array damaged)."""
    s = SoftStore(url)
    if kind == "deleted":  # a lost shard file
        i, path = first_of(s, "train") + 1, "levels/x0.25/soft"
        Path(url, s.shard_key(path, i)).unlink()
    elif kind == "bit-flip":  # one bit inside the image's first compressed chunk
        i, path = first_of(s, "train") + 1, "levels/x0.125/rgb"
        shard = Path(url, s.shard_key(path, i))
        data = bytearray(shard.read_bytes())
        offset = int(s._shard_index(path, i)[i % s.images_per_shard, 0])
        data[offset + 20] ^= 0x10
        shard.write_bytes(bytes(data))
    elif kind == "truncated":  # a full-resolution label shard cut short
        i, path = first_of(s, "val"), "full/label"
        shard = Path(url, s.shard_key(path, i))
        shard.write_bytes(shard.read_bytes()[:100])
    elif kind == "planes":  # valid checksums, invalid probabilities (written through zarr)
        i, path = first_of(s, "train"), "levels/x0.25/soft"
        arr = zarr.open_array(url, path=path, mode="r+")
        planes = arr[i]
        planes[6:, 3, 3] = 200
        arr[i] = planes
    elif kind == "statistic":  # a statistic that does not add up
        i, path = first_of(s, "train") + 2, "levels/x0.125/stats/soft"
        arr = zarr.open_array(url, path=path, mode="r+")
        row = arr[i]
        row[0] += 100
        arr[i] = row
    else:
        raise ValueError(kind)
    return i, path


@pytest.mark.parametrize("per_shard", [1, 2])
@pytest.mark.parametrize("kind", ["deleted", "bit-flip", "truncated", "planes", "statistic"])
def test_repair_rebuilds_exactly_the_damaged_shards(samples, clean, tmp_path, kind, per_shard):
    url = copy_of(clean[per_shard], tmp_path)
    i, _ = damage(url, kind)
    shard = set(range(i - i % per_shard, i - i % per_shard + per_shard))
    report = verify(SoftStore(url))
    assert not report.ok
    assert report.damaged == (shard if kind in ("deleted", "truncated") else {i})
    assert "--repair" in report.advice(url)
    again = build(CS, samples["cityscapes"], url, options(per_shard))
    assert again.built == 0  # a plain rerun finds nothing to do: the store stays damaged
    summary = build(CS, samples["cityscapes"], url, options(per_shard), repair=True)
    assert (summary.repaired, summary.built) == (len(report.damaged), per_shard)  # one shard
    assert summary.already_done == 6 - per_shard
    assert verify(SoftStore(url)).ok
    assert_same_store(url, clean[per_shard])
    assert files_of(url) == files_of(clean[per_shard])  # byte for byte, every shard


def test_repair_of_a_clean_store_changes_nothing(samples, clean, tmp_path):
    url = copy_of(clean[2], tmp_path)
    before = {p: Path(url, p).stat().st_mtime_ns for p in files_of(url)}
    summary = build(CS, samples["cityscapes"], url, options(2), repair=True)
    assert (summary.repaired, summary.built, summary.already_done) == (0, 0, 6)
    assert {p: Path(url, p).stat().st_mtime_ns for p in files_of(url)} == before


def test_repair_refuses_what_it_cannot_repair(samples, clean, tmp_path):
    with pytest.raises(BuildError, match="no zarr store here: nothing to repair"):
        build(CS, samples["cityscapes"], str(tmp_path / "none.zarr"), options(2), repair=True)
    url = copy_of(clean[2], tmp_path)
    with pytest.raises(BuildError, match="built with other options"):
        build(CS, samples["cityscapes"], url, options(1), repair=True)
    Path(url, "images/done/zarr.json").unlink()
    with pytest.raises(BuildError, match="metadata is damaged .*delete the store"):
        build(CS, samples["cityscapes"], url, options(2), repair=True)
    for array in ("images/done", "images/hw"):  # a resume without --repair
        Path(url, array, "zarr.json").unlink(missing_ok=True)
        with pytest.raises(BuildError, match=f"metadata is damaged \\(array {array} missing"):
            build(CS, samples["cityscapes"], url, options(2))
        Path(url, array, "zarr.json").write_text('{"zarr_format": 3, "node_type": "arr')  # cut
        with pytest.raises(BuildError, match="metadata is damaged \\(bad JSON: Unterminated"):
            build(CS, samples["cityscapes"], url, options(2))
        Path(url, array, "zarr.json").write_bytes(Path(clean[2], array, "zarr.json").read_bytes())


def test_cli_verify_names_the_repair_and_build_repair_fixes_it(
    samples, clean, tmp_path, monkeypatch
):
    url = copy_of(clean[2], tmp_path)
    damage(url, "deleted")
    r = run("verify", url)
    assert r.exit_code == 1
    assert "2 image(s) have damaged or missing data" in r.text and "--repair (ROOT" in r.text
    args = ["build", "cityscapes", "--root", samples["cityscapes"], "--scales", "1/8", "1/4",
            "--images-per-shard", 2, "--out", url]  # fmt: skip
    bar = recorded_bar(monkeypatch)
    r = run(*args, "--repair")
    assert r.exit_code == 0 and "2 damaged image(s) found, 2 built, 4 already done" in r.text
    checks = [(done, total) for what, done, total in bar if what == "checking the store"]
    assert checks == sorted(checks) and checks[-1] == (6, 6) and {t for _, t in checks} == {6}
    assert bar[len(checks) :] == [("building", 4, 6), ("building", 6, 6)]  # 2 rebuilt
    assert run("verify", url).exit_code == 0
    r = run(*args[:-1], tmp_path / "none.zarr", "--repair")
    assert r.exit_code == 2 and "nothing to repair" in r.text


@pytest.mark.slow  # starts worker processes
@needs_fork
def test_a_parallel_repair_checks_and_builds_on_one_forked_pool(samples, clean, tmp_path):
    """``build --repair --jobs 2`` in the CLI: one pool, forked before the store is opened,
    checks the store and rebuilds the damaged images (no second pool of fresh interpreters)."""
    url = copy_of(clean[2], tmp_path)
    damage(url, "bit-flip")
    command = ["build", "cityscapes", "--root", str(samples["cityscapes"]), "--scales", "1/8",
               "1/4", "--images-per-shard", "2", "--out", url, "--repair", "--jobs", "2"]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", RECORD_POOL, *command], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "1 damaged image(s) found, 2 built" in r.stdout, r
    pools = [line for line in r.stdout.splitlines() if line.startswith("pool ")]
    assert pools == ["pool ProcessPoolExecutor"], r.stdout
    assert "Traceback" not in r.stderr and "leaked" not in r.stderr, r.stderr
    assert verify(SoftStore(url)).ok


@pytest.mark.parametrize("kind", ["deleted", "truncated"])
def test_softtrain_points_to_the_repair_for_missing_shards(clean, tmp_path, kind):
    url = copy_of(clean[1], tmp_path)
    if kind == "deleted":
        damage(url, "deleted")
        with pytest.raises(StoreError, match="missing shards.*softprep verify.*--repair"):
            CropDataset(url, (32, 32), "train")
    else:
        s = SoftStore(url)
        Path(url, s.shard_key("full/label", first_of(s, "val"))).unlink()
        with pytest.raises(StoreError, match="no data in full/label.*--repair"):
            EvalDataset(url, "1/8", "val")


@pytest.mark.parametrize("kind", ["bit-flip", "truncated"])
def test_a_checksum_failure_on_read_names_store_array_image_and_repair(clean, tmp_path, kind):
    url = copy_of(clean[2], tmp_path)
    i, path = damage(url, kind)
    s = SoftStore(url)
    name = s.names()[i]
    read = {
        "levels/x0.125/rgb": lambda: s.read_rgb("1/8", i),
        "full/label": lambda: s.read_full_label(i),
    }[path]
    with pytest.raises(StoreError) as e:
        read()
    text = str(e.value)
    parts = (url, path, f"image {i} ({name})", "checksum", f"softprep verify {url}", "--repair")
    assert all(part in text for part in parts), text
    if kind == "bit-flip":  # the other image of the shard reads as before
        other = i - 1 if i % 2 else i + 1
        before = SoftStore(clean[2]).read_rgb("1/8", other)
        np.testing.assert_array_equal(s.read_rgb("1/8", other), before)


# A crash leaves no litter.

LITTER = [
    "levels/x0.25/soft/.c.1.0.0.0.4242.partial",  # ours: a shard killed before its rename
    "images/done/c.0.0c0ffee.partial",  # zarr's own atomic write (a metadata chunk)
]


def add_litter(url: str) -> list[Path]:
    paths = [Path(url, p) for p in LITTER]
    for p in paths:
        p.write_bytes(b"half a shard")
    return paths


def test_resume_and_repair_remove_litter(samples, clean, tmp_path):
    for repair in (False, True):
        url = copy_of(clean[2], tmp_path / str(repair))
        litter = add_litter(url)
        summary = build(CS, samples["cityscapes"], url, options(2), repair=repair)
        assert summary.litter == 2 and not any(p.exists() for p in litter)
        assert files_of(url) == files_of(clean[2])


def test_verify_removes_litter_with_a_note_unless_a_build_holds_the_store(clean, tmp_path):
    url = copy_of(clean[2], tmp_path)
    litter = add_litter(url)
    with writer_lock(url):  # a build is writing: its temporary files are live
        report = verify(SoftStore(url))
    assert report.ok and all(p.exists() for p in litter)
    assert "2 temporary file(s)" in report.notes[0] and "left in place" in report.notes[0]
    report = verify(SoftStore(url))
    assert report.ok and not any(p.exists() for p in litter)
    assert report.notes[0].startswith("removed 2 temporary file(s) left by an interrupted write")
    assert verify(SoftStore(url)).notes == []
    add_litter(url)
    r = run("verify", url)
    assert r.exit_code == 0 and "note: removed 2 temporary file(s)" in r.text


def test_kill_9_between_write_and_rename_leaves_nothing_after_the_resume(samples, clean, tmp_path):
    """A real ``kill -9`` of the build process at the moment a shard's temporary file is
    written and not yet renamed (``--jobs 1``: the build process writes the shards)."""
    url = str(tmp_path / "s.zarr")
    script = (
        "import os, signal, sys\n"
        "from softprep import writer\n"
        "from softprep.build import BuildOptions, build\n"
        "from softprep.manifest import load_manifest\n"
        "real, calls = os.replace, [0]\n"
        "def replace(src, dst):\n"
        "    calls[0] += os.path.basename(src).startswith('.c.')  # a shard, not metadata\n"
        "    if calls[0] == 7:  # the 3rd shard file of the 2nd shard\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(src, dst)\n"
        "writer.os.replace = replace\n"
        f"build(load_manifest('cityscapes'), {str(samples['cityscapes'])!r}, {url!r}, "
        f"BuildOptions(scales={SCALES}, images_per_shard=2))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    assert writer_module.litter(url), "the kill left no temporary file: nothing tested"
    summary = build(CS, samples["cityscapes"], url, options(2))
    assert summary.litter == 1 and not writer_module.litter(url)
    assert_same_store(url, clean[2])
    assert files_of(url) == files_of(clean[2])


def test_litter_is_removed_only_inside_a_store(samples, tmp_path):
    """``--out`` naming a folder that is not a store is refused before anything is removed."""
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    mine = folder / "sub/download.partial"
    mine.write_bytes(b"a user's file")
    with pytest.raises(StoreError):
        build(CS, samples["cityscapes"], str(folder), options(2))
    assert mine.read_bytes() == b"a user's file"


# verify's options (issues 28 and 30): --quick (checksums, no decoding), --jobs, --json


@pytest.mark.parametrize("per_shard", [1, 2])
@pytest.mark.parametrize("kind", ["deleted", "bit-flip", "truncated"])
def test_quick_verify_finds_lost_cut_and_flipped_bytes_as_full_does(
    clean, tmp_path, kind, per_shard
):
    url = copy_of(clean[per_shard], tmp_path)
    damage(url, kind)
    quick, full = verify(SoftStore(url), quick=True), verify(SoftStore(url))
    assert not quick.ok and quick.quick and not full.quick
    assert quick.damaged == full.damaged and quick.problems == full.problems


def test_quick_verify_reads_no_planes(clean, tmp_path):
    url = copy_of(clean[2], tmp_path)
    damage(url, "planes")  # valid checksums around invalid probabilities: only decoding sees it
    assert verify(SoftStore(url), quick=True).ok
    assert not verify(SoftStore(url)).ok
    damage(url, "statistic")  # sums are metadata: quick checks them
    assert "'soft' statistics add up to" in "\n".join(verify(SoftStore(url), quick=True).problems)


@pytest.mark.slow  # starts worker processes
def test_verify_with_two_jobs_reports_what_one_job_does(clean, tmp_path):
    url = copy_of(clean[2], tmp_path)
    found = {
        kind: damage(url, kind)[0] for kind in ("bit-flip", "planes", "statistic", "truncated")
    }
    one, two = verify(SoftStore(url), jobs=1), verify(SoftStore(url), jobs=2)
    assert len(one.damaged) == 5 and one.damaged == two.damaged
    assert one.problems == two.problems and one.checked == two.checked == 6
    quick = verify(SoftStore(url), jobs=2, quick=True)
    assert quick.damaged == one.damaged - {found["planes"]}
    shutil.rmtree(url)  # another store at the same place: the workers, still up, see it
    shutil.copytree(clean[1], url)
    assert verify(SoftStore(url), jobs=2).ok


def test_cli_verify_json(clean, tmp_path):
    import json

    url = copy_of(clean[2], tmp_path)
    r = run("verify", url, "--json", "--jobs", 1)
    report = json.loads(r.stdout)
    assert r.exit_code == 0 and report["ok"] and report["next_step"] is None
    assert (report["mode"], report["images"], report["checked"], report["problems"]) == (
        "full",
        6,
        6,
        [],
    )
    levels = len(SoftStore(url).scales)
    assert f"ok: 6 images, {levels} levels (full" in run("verify", url, "--jobs", 1).stdout
    i, _ = damage(url, "bit-flip")
    r = run("verify", url, "--json", "--quick")
    report = json.loads(r.stdout)
    assert r.exit_code == 1 and not report["ok"] and report["mode"] == "quick"
    assert report["damaged"] == [{"index": i, "name": SoftStore(url).names()[i]}]
    assert "unreadable" in report["problems"][0] and "--repair" in report["next_step"]
    assert set(report) == {
        "store", "ok", "mode", "images", "checked", "problems", "damaged", "metadata_ok",
        "skipped", "notes", "next_step", "seconds",
    }  # fmt: skip
    r = run("verify", url, "--jobs", 0)
    assert r.exit_code == 2 and "--jobs takes a positive number or auto" in r.text
