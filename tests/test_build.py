"""softprep build: pairing, fidelity, store layout, resume, parallelism, errors, verify."""

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from softprep import OWN_PROCESS
from softprep import build as build_module
from softprep import fidelity as fidelity_module
from softprep import layout as layout_module
from softprep import verify as verify_module
from softprep.build import BuildError, BuildOptions, build
from softprep.manifest import VOID, load_manifest
from softprep.options import choose_images_per_shard
from softprep.resample import Resampler
from softprep.sample import write_sample
from softprep.store import SoftStore, StoreError
from softprep.verify import verify
from tests.conftest import needs_fork

SCALES = (0.125, 0.25, 0.5)


def arrays_of(url):
    """Every array of a store as numpy, by path (for equality checks)."""
    root = zarr.open_group(url, mode="r")
    out = {}
    for path, arr in root.members(max_depth=None):
        if isinstance(arr, zarr.Array):
            out[path] = arr[:]
    return out


def assert_same_store(a, b, sources=False):
    """Every array equal; the source stamps (the files' sizes and times when each image was
    built, not the store's content) only with ``sources``."""
    x, y = arrays_of(a), arrays_of(b)
    assert sorted(x) == sorted(y)
    for k in x:
        if k != layout_module.SOURCE or sources:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def one_hot_dataset(root: Path, n=3, hw=(67, 93)):
    """A 3-class folder dataset whose colour image IS its one-hot label x 255."""
    manifest = {
        "dataset": "folder",
        "version": "onehot",
        "classes": [
            {"id": i, "name": f"c{i}", "color": [255 * (i == j) for j in range(3)]}
            for i in range(3)
        ],
        "label_values": {"0": 0, "1": 1, "2": 2},
        "splits": {"train": "train"},
        "eval_splits": [],
        "layout": {
            "images": "images/{split}",
            "image_suffix": ".png",
            "labels": "labels/{split}",
            "label_suffix": ".png",
        },
    }
    rng = np.random.default_rng(0)
    for i in range(n):
        lab = (
            rng.integers(0, 3, (hw[0] // 3 + 1, hw[1] // 5 + 1))
            .repeat(3, 0)
            .repeat(5, 1)[: hw[0], : hw[1]]
            .astype(np.uint8)
        )
        lab[:, rng.integers(0, hw[1], 4)] = 2  # thin lines
        (root / "images/train").mkdir(parents=True, exist_ok=True)
        (root / "labels/train").mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.eye(3)[lab] * 255).astype(np.uint8)).save(
            root / f"images/train/{i}.png"
        )
        Image.fromarray(lab).save(root / f"labels/train/{i}.png")
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest))
    return load_manifest(str(path))


@pytest.mark.parametrize(
    "kernel,antialias",
    [
        ("bilinear", True),
        ("area", True),
        ("bilinear", False),
        ("area", False),
        ("nearest", True),
        ("nearest-floor", True),
    ],
)
def test_pairing_colour_equals_255_times_soft_label(tmp_path, kernel, antialias):
    m = one_hot_dataset(tmp_path / "data")
    url = str(tmp_path / "s.zarr")
    build(
        m,
        tmp_path / "data",
        url,
        BuildOptions(scales=(0.125, 0.3, 0.5, 1.5), kernel=kernel, antialias=antialias, k=3),
    )
    s = SoftStore(url)
    for scale in s.scales:
        for i in range(len(s)):
            index, q = s.read_soft(scale, i)
            rgb = s.read_rgb(scale, i).astype(int)
            soft = np.zeros(rgb.shape, dtype=int)
            for k in range(3):
                for c in range(3):
                    soft[..., c] += np.where(index[k] == c, q[k], 0)
            assert np.abs(rgb - soft).max() <= 1, (kernel, scale)


def test_soft_statistics_are_the_stored_planes_totals(samples, tmp_path):
    """``stats/soft`` of each image equals the class totals of its stored planes, summed
    here from what ``read_soft`` returns."""
    url = str(tmp_path / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=SCALES))
    s = SoftStore(url)
    c = len(s.classes)
    for scale in SCALES:
        stats = s.stats(scale, "soft")
        for i in range(len(s)):
            index, q = s.read_soft(scale, i)
            totals = np.bincount(index.ravel(), q.ravel() / 255, minlength=256)
            expected = np.concatenate([totals[:c], totals[255:]])
            np.testing.assert_allclose(stats[i], expected, rtol=0, atol=1e-6)


FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from softprep import keep_freed_buffers
    keep_freed_buffers()
def rounds(n):  # 20 MiB in 2 MiB buffers made and freed, as per image or shard
    for _ in range(n):
        buffers = [np.ones(2 << 20, np.uint8) for _ in range(10)]
        del buffers
rounds(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_keep_freed_buffers_ends_the_page_faults_of_buffers_freed_and_made_again():
    """glibc hands freed buffers back and faults them in again for the next image (verify
    of 701 CamVid images: 596k faults, 1.0 s of 2.5 s); kept, they cost nothing again."""
    env = {  # glibc's defaults: no malloc tuning or other allocator from the environment
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")
    }
    faults = {}
    for mode in ("keep", "default"):  # fresh processes: the setting is for the process
        r = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True,
                           text=True, timeout=60, check=True, env=env)  # fmt: skip
        faults[mode] = int(r.stdout)
    if faults["default"] < 1000:  # e.g. the heap on huge pages: nothing to keep
        pytest.skip(f"this glibc does not fault freed buffers in again ({faults})")
    assert faults["keep"] * 20 < faults["default"], faults


def test_build_verify_and_fidelity_keep_freed_buffers(samples, tmp_path, monkeypatch):
    """The commands that work image by image (or shard by shard) set it up."""
    calls = []
    for module in (build_module, verify_module, fidelity_module):
        name = module.__name__
        monkeypatch.setattr(module, "keep_freed_buffers", lambda n=name: calls.append(n))
    url = str(tmp_path / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.25,)))
    assert verify(SoftStore(url)).ok
    fidelity_module.from_store(SoftStore(url), [], "val")
    assert set(calls) == {"softprep.build", "softprep.verify", "softprep.fidelity"}


def test_fidelity_and_priors_on_sample(samples, tmp_path):
    m = load_manifest("cityscapes")
    url = str(tmp_path / "cs.zarr")
    build(m, samples["cityscapes"], url, BuildOptions(scales=SCALES, k=6))
    s = SoftStore(url)
    counts = s.full_counts()
    for scale in SCALES:
        soft = s.stats(scale, "soft")
        p_full = counts[:, :-1].sum(0) / counts[:, :-1].sum()
        p_soft = soft[:, :-1].sum(0) / soft[:, :-1].sum()
        assert np.abs(p_full - p_soft).max() < 1e-4
    # every pixel within 1/255 (+ truncated mass) of the exact float soft label
    i = 0
    name = s.names()[i]
    split, stem = name.split("/", 1)
    label_path = samples["cityscapes"] / f"gtFine/{split}/{stem}_gtFine_labelIds.png"
    from softprep.datasets import decode_label

    label = decode_label(label_path, m)
    present = np.unique(label)
    for scale in SCALES:
        index, q = s.read_soft(scale, i)
        r = Resampler.make(label.shape, index.shape[1:], "bilinear")
        exact = r.resample_float((label[..., None] == present).astype(np.float64))
        stored = np.zeros_like(exact)
        for k in range(6):
            for j, c in enumerate(present):
                stored[..., j] += np.where(index[k] == c, q[k] / 255, 0)
        assert np.abs(stored - exact).max() <= 1 / 255 + 1e-6
        ranked = np.sort(exact, axis=-1)
        clear = ranked[..., -1] - ranked[..., -2] > 2 / 255  # a unique majority class
        assert (index[0][clear] == present[exact.argmax(-1)][clear]).all()  # slot 0 = argmax


def test_store_is_plain_zarr_with_metadata(samples, tmp_path):
    url = str(tmp_path / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.25,)))
    root = zarr.open_group(url, mode="r")
    meta = root.attrs["softprep"]
    for key in (
        "kernel",
        "antialias",
        "scales",
        "k",
        "quantisation",
        "manifest",
        "dataset",
        "dataset_version",
        "softprep_version",
        "multiscales",
    ):
        assert key in meta
    soft = root["levels/x0.25/soft"]
    assert soft.dtype == np.uint8 and soft.shape[1] == 11
    # 16 images of 256x512 per shard (one 2048x1024 image's pixels), 256x256 inner chunks
    assert soft.shards[0] == 16 and soft.chunks[0] == 1 and soft.chunks[-2:] == (64, 128)
    h, w = root["levels/x0.25/hw"][0]
    planes = soft[0, :, :h, :w]
    first = 255 - planes[6:].astype(int).sum(0)
    assert (first >= planes[6:].max(0)).all()
    names = root["images/name"][:]
    assert str(names[0]).startswith("train/")
    val = [i for i, n in enumerate(names) if str(n).startswith("val/")]
    full = root["full/label"][val[0]]
    assert full.shape == (256, 512) and set(np.unique(full)) <= set(range(19)) | {VOID}


@pytest.mark.parametrize("dataset,level", [("cityscapes", "x0.125"), ("ade20k", "x1")])
def test_shards_written_by_softprep_are_zarrs_own_bytes(samples, tmp_path, dataset, level):
    """The build's shard encoder against zarr's own write of the same data: every inner
    chunk byte for byte (indexes list chunks by position), and zarr reads it back; an image
    left out of a shard reads as fill values and is found missing. ADE20K at full size:
    arrays 256 < H, W < 512, so shards pass the array's edge."""
    from softprep.writer import ImageWriter, ShardEncoder

    url = str(tmp_path / "s.zarr")
    scale = float(level[1:].replace("_", "."))
    options = BuildOptions(scales=(scale,), images_per_shard=2)
    build(load_manifest(dataset), samples[dataset], url, options)
    root = zarr.open_group(url, mode="r+")
    rng = np.random.default_rng(0)
    paths = (f"levels/{level}/soft", f"levels/{level}/rgb", "full/label")
    data = {}
    for path in paths:
        shape = (2, *root[path].shape[1:])
        data[path] = rng.integers(0, 4, shape, dtype=np.uint8)  # compressible, varied
        data[path][..., :7] = rng.integers(0, 256, data[path][..., :7].shape, dtype=np.uint8)
    writer = ImageWriter(root)
    writer.write(
        0, [({level: (data[paths[0]][j], data[paths[1]][j])}, data[paths[2]][j]) for j in (0, 1)]
    )
    writer.write(4, [({level: (data[paths[0]][0], data[paths[1]][0])}, data[paths[2]][0]), None])
    store = SoftStore(url)
    for path in paths:
        arr = root[path]
        encoder = ShardEncoder.for_array(arr.async_array)
        assert encoder is not None, path
        arr[2:4] = data[path]  # zarr's own write path
        np.testing.assert_array_equal(arr[0:2], data[path])
        np.testing.assert_array_equal(arr[4], data[path][0])
        assert (arr[5] == arr.fill_value).all()
        n, chunks = int(np.prod(encoder.grid)), []
        for i in (0, 2):  # each shard's inner chunks, by position (from its index)
            blob = Path(url, store.shard_key(path, i)).read_bytes()
            table = np.frombuffer(blob[-(16 * n + 4) : -4], "<u8").reshape(n, 2)
            chunks.append([blob[int(o) : int(o + size)] for o, size in table])
        assert chunks[0] == chunks[1], path
        assert list(store.missing_shards(path, np.arange(6), read_indexes=True)) == [5]
        assert len(store.missing_shards(path, np.arange(6))) == 0  # the file is there


def test_arrays_of_another_layout_are_written_by_zarr(tmp_path):
    """Stores of an older layout (other codecs) take zarr's own write path."""
    from softprep.writer import ImageWriter, ShardEncoder

    root = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    shapes = {"levels/x1/soft": (2, 3, 8, 8), "levels/x1/rgb": (2, 8, 8, 3)}
    for path, shape in shapes.items():
        root.create_array(
            path, shape=shape, shards=(1, *shape[1:]), chunks=(1, *shape[1:]), dtype="uint8",
            compressors=zarr.codecs.ZstdCodec(),
        )  # fmt: skip
        assert ShardEncoder.for_array(root[path].async_array) is None
    planes, rgb = (
        np.arange(np.prod(s[1:])).reshape(s[1:]).astype(np.uint8) for s in shapes.values()
    )
    ImageWriter(root).write(1, [({"x1": (planes, rgb)}, None)])
    np.testing.assert_array_equal(root["levels/x1/soft"][1], planes)
    np.testing.assert_array_equal(root["levels/x1/rgb"][1], rgb)


def test_an_fsspec_url_store_equals_a_local_one(samples, tmp_path):
    """``file://`` goes through zarr's fsspec store (the write path of remote stores),
    a plain path through the direct local writes."""
    m, opts = load_manifest("cityscapes"), BuildOptions(scales=(0.25,))
    local, url = tmp_path / "a.zarr", f"file://{tmp_path}/b.zarr"
    build(m, samples["cityscapes"], str(local), opts)
    build(m, samples["cityscapes"], url, opts)
    assert_same_store(str(local), str(tmp_path / "b.zarr"))
    assert not list(local.rglob("*.partial")) and verify(SoftStore(url)).ok
    assert type(SoftStore(url).root.store).__name__ == "FsspecStore"


def test_a_store_in_memory_is_built_and_verified_in_this_process_whatever_the_jobs(
    samples, tmp_path
):
    """fsspec's ``memory://`` files belong to one process: workers would write into and
    check a copy of them (forked) or nothing (fresh interpreters)."""
    m, opts = load_manifest("cityscapes"), BuildOptions(scales=(0.25,), images_per_shard=2)
    local, url = tmp_path / "a.zarr", f"memory://{tmp_path.name}.zarr"
    build(m, samples["cityscapes"], str(local), opts)
    assert build(m, samples["cityscapes"], url, opts, jobs=2).built == len(SoftStore(local))
    assert_same_store(str(local), url)
    for store in (url, SoftStore(url)):  # a path, as the CLI gives it, or an open store
        report = verify(store, jobs=2)
        assert report.ok and report.checked == len(SoftStore(local)), report.problems


def test_resume_after_interruptions_equals_uninterrupted(samples, tmp_path, monkeypatch):
    m = load_manifest("cityscapes")
    opts = BuildOptions(scales=SCALES, images_per_shard=2)
    ref = str(tmp_path / "ref.zarr")
    build(m, samples["cityscapes"], ref, opts)
    url = str(tmp_path / "resumed.zarr")
    real_write = build_module.writer.ImageWriter.write
    calls = {"n": 0}

    def dying_write(writer, first, images):
        calls["n"] += 1
        if calls["n"] == 2:  # die half-way through a shard's arrays
            levels, _ = images[0]
            real_write(writer, first, [(dict(list(levels.items())[:1]), None), None])
            raise KeyboardInterrupt
        real_write(writer, first, images)

    monkeypatch.setattr(build_module.writer.ImageWriter, "write", dying_write)
    monkeypatch.setattr(build_module, "FLUSH_EVERY", 1)
    with pytest.raises(KeyboardInterrupt):
        build(m, samples["cityscapes"], url, opts)
    monkeypatch.undo()
    assert 0 < SoftStore(url).done().sum() < 6
    summary = build(m, samples["cityscapes"], url, opts)
    assert summary.already_done == 2 and summary.built == 4
    assert_same_store(ref, url, sources=True)


def _flip_label(path: Path, mtime_ns: int) -> None:
    """Rewrite a one-hot dataset's label with classes 0 and 1 swapped (another content, same
    size on disk is not promised) and give it ``mtime_ns``."""
    lab = np.asarray(Image.open(path))
    Image.fromarray(np.choose(lab, [1, 0, 2]).astype(np.uint8)).save(path)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_rebuild_after_a_source_changed_rebuilds_that_image(tmp_path):
    """A file changed since its image was built (same name, new content) is rebuilt on the
    next run, with its shard; the store then equals a fresh build of the changed dataset."""
    m = one_hot_dataset(tmp_path / "data", n=4)
    opts = BuildOptions(scales=(0.5,), images_per_shard=2)
    url = str(tmp_path / "a.zarr")
    build(m, tmp_path / "data", url, opts)
    label = tmp_path / "data/labels/train/2.png"
    _flip_label(label, label.stat().st_mtime_ns + 10**9)
    summary = build(m, tmp_path / "data", url, opts)
    assert summary.changed == ["train/2"]
    assert (summary.built, summary.already_done) == (2, 2)  # image 2 with its shard-mate 3
    build(m, tmp_path / "data", str(tmp_path / "fresh.zarr"), opts)
    assert_same_store(str(tmp_path / "fresh.zarr"), url, sources=True)
    assert build(m, tmp_path / "data", url, opts).changed == []  # and now it is up to date


def test_a_copied_or_touched_dataset_keeps_its_images_unless_their_bytes_changed(tmp_path):
    """Files with new times but the same sizes are read: the same bytes (a copy without
    kept times, ``touch``) keep their images and the new times are recorded; other bytes
    of the same size (an uncompressed PNG edited) rebuild theirs."""
    import shutil

    m = one_hot_dataset(tmp_path / "data", n=4)
    label = tmp_path / "data/labels/train/1.png"
    Image.open(label).save(label, compress_level=0)  # its size no longer depends on the bytes
    opts = BuildOptions(scales=(0.5,), images_per_shard=1)
    url = str(tmp_path / "a.zarr")
    build(m, tmp_path / "data", url, opts)
    shutil.copytree(tmp_path / "data", tmp_path / "copy", copy_function=shutil.copyfile)
    calls = []
    summary = build(m, tmp_path / "copy", url, opts, checking=lambda *c: calls.append(c))
    assert (summary.changed, summary.retimed, summary.built) == ([], 4, 0)  # every time differs
    assert calls == [("checking changed files", k, 4) for k in (1, 2, 3, 4)]  # the reads' bar
    calls.clear()
    summary = build(m, tmp_path / "copy", url, opts, checking=lambda *c: calls.append(c))
    assert summary.retimed == 0 and not calls  # the new times are recorded
    size = label.stat().st_size
    lab = np.asarray(Image.open(tmp_path / "copy/labels/train/1.png"))
    Image.fromarray(np.choose(lab, [1, 0, 2]).astype(np.uint8)).save(
        tmp_path / "copy/labels/train/1.png", compress_level=0
    )
    assert (tmp_path / "copy/labels/train/1.png").stat().st_size == size
    summary = build(m, tmp_path / "copy", url, opts)
    assert (summary.changed, summary.retimed, summary.built) == (["train/1"], 0, 1)
    build(m, tmp_path / "copy", str(tmp_path / "fresh.zarr"), opts)
    assert_same_store(str(tmp_path / "fresh.zarr"), url)


def test_a_resume_with_another_manifest_of_the_same_name_is_refused(tmp_path):
    """A store records its manifest: a resume whose classes or label values differ (the
    user's manifest edited, or the built-in template of the same name) would rebuild images
    with another mapping; refused, and the printed command names the manifest file."""
    m = one_hot_dataset(tmp_path / "data", n=2)
    url, opts = str(tmp_path / "a.zarr"), BuildOptions(scales=(0.5,), images_per_shard=1)
    build(m, tmp_path / "data", url, opts)
    path = tmp_path / "data/manifest.json"
    raw = json.loads(path.read_text())
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(raw | {"label_values": {"0": 1, "1": 0, "2": 2}}))
    with pytest.raises(BuildError, match="built with another folder manifest") as refused:
        build(load_manifest(str(swapped)), tmp_path / "data", url, opts)
    assert "delete it (2 finished image(s) in it)" in str(refused.value)  # what it would lose
    assert build(m, tmp_path / "data", url, opts).already_done == 2  # its own: resumes
    with pytest.raises(BuildError) as refused:  # its own, an option left out
        build(m, tmp_path / "data", url, BuildOptions(scales=(0.5,)))
    assert f"give its options: softprep build {path} --root {tmp_path / 'data'}" in str(
        refused.value
    )
    assert "delete it (2 finished image(s) in it)" in str(refused.value)


def test_an_unreadable_source_record_is_replaced_and_verify_names_it(tmp_path):
    m = one_hot_dataset(tmp_path / "data", n=2)
    url = str(tmp_path / "a.zarr")
    build(m, tmp_path / "data", url, BuildOptions(scales=(0.5,)))
    chunks = [p for p in Path(url, layout_module.SOURCE, "c").rglob("*") if p.is_file()]
    for chunk in chunks:
        chunk.write_bytes(b"garbage")
    assert chunks
    report = verify(SoftStore(url))
    assert not report.ok and report.layout and not report.damaged
    assert "images/source: unreadable" in report.problems[0]
    summary = build(m, tmp_path / "data", url, BuildOptions(scales=(0.5,)))
    assert summary.record_replaced and summary.built == 0 and verify(SoftStore(url)).ok
    assert summary.notes() == [
        "the store's record of its source files (images/source) was unreadable and is "
        "replaced: images built before are no longer checked for changed files"
    ]


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_store_without_source_stamps_resumes_and_records_them(tmp_path, scheme):
    """Stores built before the stamps existed resume without rebuilding anything, get the
    array, and record stamps for what they build from then on (also through a file:// URL,
    whose new folders fsspec makes only when asked)."""
    m = one_hot_dataset(tmp_path / "data", n=4)
    opts = BuildOptions(scales=(0.5,), images_per_shard=1)
    url = scheme + str(tmp_path / "old.zarr")
    build(m, tmp_path / "data", url, opts)
    store = zarr.open_group(url, mode="r+")
    store[layout_module.DONE][3] = False  # one image left to build
    import shutil

    shutil.rmtree(tmp_path / "old.zarr" / layout_module.SOURCE)
    label = tmp_path / "data/labels/train/0.png"
    _flip_label(label, label.stat().st_mtime_ns + 10**9)  # unknowable for an old store
    summary = build(m, tmp_path / "data", url, opts)
    assert (summary.changed, summary.built) == ([], 1)
    recorded = zarr.open_group(url, mode="r")[layout_module.SOURCE][:]
    assert not recorded[:3].any() and recorded[3].all() and verify(SoftStore(url)).ok


def test_a_stopped_rebuild_of_a_changed_image_leaves_the_store_incomplete(tmp_path):
    """Images marked for a rebuild make the store's ``complete`` attribute false at once,
    so a run that stops (here: the changed file is now broken) leaves no false claim."""
    m = one_hot_dataset(tmp_path / "data", n=3)
    url = str(tmp_path / "a.zarr")
    build(m, tmp_path / "data", url, BuildOptions(scales=(0.5,)))
    assert SoftStore(url).meta["complete"]
    image = tmp_path / "data/images/train/1.png"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(BuildError, match="images/train/1.png"):
        build(m, tmp_path / "data", url, BuildOptions(scales=(0.5,)))
    store = SoftStore(url)
    assert not store.meta["complete"] and not store.done()[1]


def test_a_source_that_changed_size_is_refused_by_name(tmp_path):
    m = one_hot_dataset(tmp_path / "data", n=2)
    url = str(tmp_path / "a.zarr")
    build(m, tmp_path / "data", url, BuildOptions(scales=(0.5,)))
    for folder in ("images", "labels"):
        path = tmp_path / f"data/{folder}/train/1.png"
        im = Image.open(path)
        im.crop((0, 0, im.width - 4, im.height)).save(path)
    with pytest.raises(BuildError, match=r"images/train/1\.png: is 89x67 now, 93x67 in"):
        build(m, tmp_path / "data", url, BuildOptions(scales=(0.5,)))


@pytest.mark.slow
def test_resume_after_sigkill_subprocess(samples, tmp_path):
    """Kill a real build process at random moments; the rerun must equal a clean build."""
    ref, url = str(tmp_path / "ref.zarr"), str(tmp_path / "killed.zarr")
    cmd = [
        sys.executable,
        "-m",
        "softprep",
        "build",
        "cityscapes",
        "--root",
        str(samples["cityscapes"]),
        "--scales",
        "1/8",
        "1/2",
    ]
    subprocess.run([*cmd, "--out", ref], check=True, capture_output=True)
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.6, 2.0, 3):
        p = subprocess.Popen(
            [*cmd, "--out", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    subprocess.run([*cmd, "--out", url], check=True, capture_output=True)
    assert_same_store(ref, url)
    assert verify(SoftStore(url)).ok


@pytest.mark.parametrize("dataset,scales", [("cityscapes", (0.125, 0.5)), ("ade20k", (0.5, 1.0))])
def test_windows_read_from_shard_files_equal_zarrs_reads(samples, tmp_path, dataset, scales):
    """``SoftStore``'s direct reads of local shards (``ShardReader.window``) against zarr's
    own read of the same selection: windows inside one chunk, across chunks, whole images,
    past the images (padding) and past the array's edge; 2 images per shard, an image left
    out of its shard and a deleted shard (both the fill value). ADE20K at full size: arrays
    256 < H, W < 512, so shards pass the array's edge."""
    url = str(tmp_path / "s.zarr")
    build(
        load_manifest(dataset),
        samples[dataset],
        url,
        BuildOptions(scales=scales, images_per_shard=2),
    )
    store = SoftStore(url)
    n = len(store)
    paths = store.image_arrays()
    some = paths[0]  # image 1 of shard 0 left out; all of image 2's shards deleted
    data = zarr.open_group(url, mode="r+")[some]
    data[1] = data.fill_value  # zarr drops the image's chunks (all fill) from the shard
    for path in paths:
        Path(url, store.shard_key(path, 2)).unlink(missing_ok=True)
    Path(url, store.shard_key(paths[-1], 2)).mkdir()  # a folder there: absent, as for zarr
    rng = np.random.default_rng(0)
    compared = 0
    for path in paths:
        arr = store.array(path)
        h, w = arr.shape[-3:-1] if path.endswith("rgb") else arr.shape[-2:]
        for i in range(n):
            windows = [(0, 0, h, w), (0, 0, h + 300, w + 300), (h - 1, w - 1, 5, 5)]
            windows += [(int(rng.integers(h)), int(rng.integers(w)), int(rng.integers(1, 300)),
                         int(rng.integers(1, 300))) for _ in range(6)]  # fmt: skip
            for y0, x0, hh, ww in windows:
                space = (slice(y0, y0 + hh), slice(x0, x0 + ww))
                planes = () if path.endswith("rgb") else (slice(None),) * (arr.ndim - 3)
                selection = (i, *planes, *space)
                got = store._read(path, i, selection)
                assert got.dtype == np.uint8
                np.testing.assert_array_equal(got, arr[selection], err_msg=f"{path} {i} {space}")
                compared += 1
        assert store._readers[path] is not None, f"{path}: not read directly"
    assert compared == len(paths) * n * 9
    assert (store._read(some, 1, (1,)) == 0).all() and (store._read(some, 2, (2,)) == 0).all()
    np.testing.assert_array_equal(store._read(some, -1, (-1,)), store.array(some)[-1])
    with pytest.raises(IndexError, match=f"image {n} of an array of {n}"):
        store._read(some, n, (n,))


def test_arrays_whose_images_span_several_shards_are_read_through_zarr(tmp_path):
    """The direct reader and writer take whole images per shard; another sharding of the
    same codecs is left to zarr."""
    from softprep.layout import LABEL_CODECS
    from softprep.store import ShardReader

    group = zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    for shards, direct in [((1, 512, 512), True), ((1, 256, 256), False)]:
        arr = group.create_array(
            f"a{shards[1]}", shape=(2, 300, 400), chunks=(1, 256, 256), shards=shards,
            dtype="uint8", compressors=LABEL_CODECS,
        )  # fmt: skip
        assert (ShardReader.for_array(arr) is not None) == direct, shards


def test_a_damaged_shard_read_by_a_crop_names_the_store_array_and_image(samples, tmp_path):
    url = str(tmp_path / "s.zarr")
    options = BuildOptions(scales=(0.25,), images_per_shard=2)
    build(load_manifest("cityscapes"), samples["cityscapes"], url, options)
    store = SoftStore(url)
    shard = Path(url, store.shard_key("levels/x0.25/soft", 1))
    good = shard.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) * 3 // 4] ^= 0x10  # a bit of image 1's chunk (the shard's second half)
    for data, why in [
        (bytes(damaged), "stored and computed checksum of inner chunk 0 do not match"),
        (good[:-3], "stored and computed checksum of the shard index do not match"),
        (good[:10], "shard of 10 bytes is shorter than its index"),
    ]:
        shard.write_bytes(data)
        where = f"{url}: levels/x0.25/soft of image 1 ({store.names()[1]}) is damaged ({why})"
        with pytest.raises(StoreError, match=re.escape(where)):
            SoftStore(url).read_soft(0.25, 1, (0, 0, 8, 8))


def test_images_per_shard_from_the_image_size():
    def per_shard(hw, **kw):
        return choose_images_per_shard(np.array([hw] * 3), BuildOptions((0.5,), **kw))

    assert per_shard((1024, 2048)) == 1 and per_shard((4000, 6000)) == 1
    assert per_shard((512, 683)) == 5  # ADE20K-size: 2048 * 1024 // (512 * 683)
    assert per_shard((64, 64)) == 16  # at most 16
    assert per_shard((512, 683), images_per_shard=2) == 2
    with pytest.raises(ValueError, match="images per shard"):
        BuildOptions((0.5,), images_per_shard=0)


def test_metadata_chunks_stay_small_for_many_classes(tmp_path):
    """The parent rewrites the chunks of per-image statistics as results come in: a chunk
    of 150-class float64 rows holds at most META_CHUNK_BYTES; narrow arrays keep
    META_CHUNK rows. Statistics written across chunks read back."""
    n, c = 5000, 150
    hw = np.tile([512, 683], (n, 1))
    root = layout_module.create(
        str(tmp_path / "s.zarr"), {}, [f"train/{i}" for i in range(n)], np.zeros(n, np.uint8),
        hw, {0.5: hw // 2}, c, 6, ["soft"], np.zeros(n, bool), 5,
    )  # fmt: skip
    stats = root["levels/x0.5/stats/soft"]
    rows = stats.chunks[0]
    assert rows * (c + 1) * 8 <= layout_module.META_CHUNK_BYTES and rows >= 200
    assert root["images/done"].chunks == (layout_module.META_CHUNK,)
    assert root["levels/x0.5/truncated"].chunks == (layout_module.META_CHUNK, 2)
    values = np.random.default_rng(0).random((300, c + 1))
    stats.oindex[list(range(100, 400)), :] = values  # across a chunk boundary
    np.testing.assert_array_equal(stats[100:400], values)


def test_jobs_2_equals_jobs_1(samples, tmp_path):
    m = load_manifest("ade20k")
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    opts = BuildOptions(scales=(0.5, 0.25), short_side=128, images_per_shard=4)
    build(m, samples["ade20k"], a, opts, jobs=1)
    build(m, samples["ade20k"], b, opts, jobs=2)
    assert_same_store(a, b)
    shards = sorted(p.relative_to(a) for p in Path(a).glob("levels/*/*/c.*"))
    assert len(shards) == 2 * 2 * 2  # 6 images in shards of 4 and 2, 2 levels, soft and rgb
    for shard in shards:  # byte for byte
        assert Path(a, shard).read_bytes() == Path(b, shard).read_bytes(), shard
    hw = SoftStore(a).hw(0.5)
    assert (hw.min(axis=1) == 64).all()  # short side 128 * 0.5


def test_changed_option_is_refused(samples, tmp_path):
    m = load_manifest("cityscapes")
    url = str(tmp_path / "cs.zarr")
    build(m, samples["cityscapes"], url, BuildOptions(scales=(0.25,)))
    with pytest.raises(BuildError, match="kernel: 'bilinear' -> 'area'"):
        build(m, samples["cityscapes"], url, BuildOptions(scales=(0.25,), kernel="area"))


def test_bad_pair_fail_and_skip(samples, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(samples["mapillary-v1.2"], root)
    m = load_manifest("mapillary", "v1.2")
    bad = sorted((root / "training/v1.2/labels").glob("*.png"))[2]
    original = Image.open(bad)
    arr = np.asarray(original).copy()
    arr[0, 0] = 200  # not a v1.2 label
    damaged = Image.fromarray(arr, "P")
    damaged.putpalette(original.getpalette())  # a full palette keeps the indices as written
    damaged.save(bad)
    url = str(tmp_path / "m.zarr")
    with pytest.raises(BuildError, match=str(bad)):
        build(m, root, url, BuildOptions(scales=(0.25,)))
    before = SoftStore(url).done().copy()
    summary = build(m, root, url, BuildOptions(scales=(0.25,)), on_error="skip")
    assert [p.path for p in summary.skipped] == [str(bad)]
    s = SoftStore(url)
    assert s.done().sum() == len(s) - 1 and (s.done() >= before).all()
    assert s.describe()["skipped"][0]["path"] == str(bad)
    from softtrain.data import CropDataset

    crops = CropDataset(url, (32, 32), "train")  # trains on the rest, without the skipped one
    skipped = s.describe()["skipped"][0]["index"]
    assert skipped not in crops.items and len(crops.items) == (s.split_of() == "train").sum() - 1
    report = verify(s)
    assert report.ok and len(report.skipped) == 1 and str(bad) in report.skipped[0]


def test_verify_detects_damage(samples, tmp_path):
    url = str(tmp_path / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.25, 0.5)))
    assert verify(SoftStore(url)).ok
    root = zarr.open_group(url, mode="r+")
    planes = root["levels/x0.25/soft"][1]
    planes[6:, 5, 5] = 200  # probabilities now exceed 255
    planes[0, 7, 7], planes[6, 7, 7] = 77, 0  # an unknown class id with mass
    root["levels/x0.25/soft"][1] = planes
    shard = Path(url, SoftStore(url).shard_key("levels/x0.5/soft", 2))  # image 2's shard
    shard.write_bytes(b"garbage" * 10)
    done = root["images/done"]
    done[4] = False
    report = verify(SoftStore(url))
    text = "\n".join(report.problems)
    assert (
        "exceed 255" in text
        and "class ids [77]" in text
        and "unreadable" in text
        and "not built" in text
    )


@pytest.mark.parametrize("jobs", [2, -1])  # -1: the CLI's --backend dask --jobs auto
def test_dask_backend_equals_loky(samples, tmp_path, monkeypatch, jobs):
    pytest.importorskip("dask.distributed")
    import threading

    import joblib
    from dask.distributed import Client

    m = load_manifest("cityscapes")
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    opts = BuildOptions(scales=(0.25,), images_per_shard=2)
    build(m, samples["cityscapes"], a, opts)
    task, log = build_module._task, tmp_path / "threads.txt"

    def recorded(*args):  # Dask pickles it (a copy of a list would record nothing here)
        with open(log, "a") as f:
            f.write(threading.current_thread().name + "\n")
        return task(*args)

    monkeypatch.setattr(build_module, "_task", recorded)
    with (
        Client(processes=False, n_workers=1, threads_per_worker=2),
        joblib.parallel_config(backend="dask"),
    ):
        build(m, samples["cityscapes"], b, opts, jobs=jobs)
    assert_same_store(a, b)
    ran_in = log.read_text().split()
    assert ran_in and "MainThread" not in ran_in  # on Dask's workers, not in the caller


def test_negative_jobs_and_a_daemon_process_build_as_joblib_counts_them(samples, tmp_path):
    """jobs=-1 is one process per core (joblib's rule, through the API); a daemon process,
    which may start none, builds with one; so does JOBLIB_MULTIPROCESSING=0 (threads)."""
    from softprep.verify import verify

    m, opts = load_manifest("cityscapes"), BuildOptions(scales=(0.25,), images_per_shard=2)
    one, many = str(tmp_path / "1.zarr"), str(tmp_path / "many.zarr")
    build(m, samples["cityscapes"], one, opts)
    build(m, samples["cityscapes"], many, opts, jobs=-1)
    assert_same_store(one, many)
    assert verify(SoftStore(many), jobs=-1).ok
    for way in ("daemon", "threads"):
        code = (
            "import multiprocessing as mp, sys\n"
            "from softprep.build import BuildOptions, build\n"
            "from softprep.manifest import load_manifest\n"
            "def run():\n"
            "    opts = BuildOptions(scales=(0.25,), images_per_shard=2)\n"
            "    build(load_manifest('cityscapes'), sys.argv[1], sys.argv[2], opts, jobs=2)\n"
            "if __name__ == '__main__':\n"
            "    if sys.argv[3] == 'daemon':\n"
            "        p = mp.get_context('spawn').Process(target=run, daemon=True)\n"
            "        p.start(); p.join(); sys.exit(p.exitcode)\n"
            "    run()\n"
        )
        script, out = tmp_path / "run.py", str(tmp_path / f"{way}.zarr")
        script.write_text(code)
        env = os.environ | ({"JOBLIB_MULTIPROCESSING": "0"} if way == "threads" else {})
        args = [sys.executable, str(script), str(samples["cityscapes"]), out, way]
        r = subprocess.run(args, env=env, capture_output=True, text=True)
        assert r.returncode == 0, (way, r.stderr[-2000:])
        assert_same_store(one, out)


def test_a_scale_twice_is_refused_for_a_new_store_and_an_old_one_so_built_resumes(
    samples, tmp_path
):
    m, root = load_manifest("cityscapes"), samples["cityscapes"]
    twice = BuildOptions(scales=(0.125, 0.25, 0.125))
    with pytest.raises(BuildError, match="scale 1/8 is given twice"):
        build(m, root, str(tmp_path / "new.zarr"), twice)
    url = str(tmp_path / "old.zarr")  # as the old code built one: its records say it twice
    first = build(m, root, url, BuildOptions(scales=(0.125, 0.25)))
    group = zarr.open_group(url, mode="r+")
    meta = dict(group.attrs[layout_module.NAMESPACE])
    meta["config"] = meta["config"] | {"scales": list(twice.scales)}
    meta["scales"] = list(twice.scales)
    group.attrs[layout_module.NAMESPACE] = meta
    assert build(m, root, url, twice).already_done == first.built  # resumes with them
    from softprep.fidelity import from_store

    assert from_store(SoftStore(url), ["nn"], "val").levels  # and reads


def test_a_refused_resume_is_said_when_the_done_flags_are_unreadable(samples, tmp_path):
    m, root, url = load_manifest("cityscapes"), samples["cityscapes"], str(tmp_path / "s.zarr")
    build(m, root, url, BuildOptions(scales=(0.25,)))
    for chunk in Path(url, layout_module.DONE).rglob("c/*"):
        chunk.write_bytes(b"garbage")
    with pytest.raises(BuildError, match="built with other options") as refused:
        build(m, root, url, BuildOptions(scales=(0.5,)))
    assert "use another --out or delete it" in str(refused.value)


def test_a_store_that_recorded_a_relative_unlabeled_folder_resumes(samples, tmp_path, monkeypatch):
    """Built through the API before BuildOptions resolved --unlabeled, a store records the
    folder as given; the same folder resolved is the same option (was refused)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 32), (90, 120, 40)).save(tmp_path / "photos" / "a.png")
    m, opts = load_manifest("cityscapes"), BuildOptions(scales=(0.5,), unlabeled="photos")
    assert opts.unlabeled == str(tmp_path / "photos")
    assert BuildOptions(scales=(0.5,), unlabeled="").unlabeled is None  # no folder, not "."
    first = build(m, samples["cityscapes"], "s.zarr", opts)
    group = zarr.open_group("s.zarr", mode="r+")
    meta = dict(group.attrs[layout_module.NAMESPACE])
    meta["config"] = meta["config"] | {"unlabeled": "photos"}  # as such a store has it
    group.attrs[layout_module.NAMESPACE] = meta
    again = build(m, samples["cityscapes"], "s.zarr", opts)
    assert again.built == 0 and again.already_done == first.built > 0


def test_a_build_on_the_default_backend_imports_no_joblib(samples, tmp_path):
    """Two jobs as the CLI runs them (forked workers), and one: joblib's import (~50 ms of
    every command's start-up) is left to Dask and loky's workers."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from softprep import OWN_PROCESS\n"
        "from softprep.build import BuildOptions, build\n"
        "from softprep.manifest import load_manifest\n"
        "m, opts = load_manifest('cityscapes'), BuildOptions(scales=(0.25,))\n"
        "os.environ[OWN_PROCESS] = '1'  # first: it forks before zarr starts a thread\n"
        "s = build(m, sys.argv[1], sys.argv[2] + '/2.zarr', opts, jobs=2, keep_workers=False)\n"
        "build(m, sys.argv[1], sys.argv[2] + '/1.zarr', opts)\n"
        "assert s.built > 0\n"
        "sys.exit('joblib' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(samples["cityscapes"]), str(tmp_path)])
    assert r.returncode == 0
    assert_same_store(str(tmp_path / "1.zarr"), str(tmp_path / "2.zarr"))


@pytest.mark.parametrize(
    "name,version,folder,short_side",
    [
        ("cityscapes", None, "cityscapes", None),
        ("mapillary", "v2.0", "mapillary", 64),
        ("ade20k", None, "ade20k", 128),
    ],
)
def test_build_on_real_fixture_files(tmp_path, name, version, folder, short_side):
    from tests.conftest import FIXTURES, FIXTURES_ABSENT

    if not FIXTURES.is_dir():
        pytest.skip(FIXTURES_ABSENT)
    url = str(tmp_path / "real.zarr")
    opts = BuildOptions(scales=(0.25, 0.5), short_side=short_side)
    summary = build(load_manifest(name, version), FIXTURES / folder, url, opts)
    s = SoftStore(url)
    assert summary.built == len(s) > 0 and verify(s).ok
    report_counts = s.full_counts().sum(0)
    assert report_counts[:-1].sum() > 0  # real classes, not only void


def test_never_overwrites_something_that_is_not_a_store(samples, tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    with pytest.raises(StoreError, match="refusing to overwrite"):
        build(
            load_manifest("cityscapes"),
            samples["cityscapes"],
            str(precious),
            BuildOptions(scales=(0.25,)),
        )
    assert (precious / "chapter1.tex").read_text() == "years of work"


def test_mmseg_style_store_pairs_bilinear_colour_with_nearest_labels(samples, tmp_path):
    """--kernel nearest --colour-kernel bilinear: the labels of a nearest store, the colour
    of a bilinear one (mmsegmentation's pipeline); a resume with another colour kernel is
    refused."""
    root, m = samples["cityscapes"], load_manifest("cityscapes")
    urls = {}
    for name, options in {
        "nearest": dict(kernel="nearest"),
        "bilinear": dict(kernel="bilinear"),
        "mmseg": dict(kernel="nearest", colour_kernel="bilinear"),
    }.items():
        urls[name] = str(tmp_path / f"{name}.zarr")
        build(m, root, urls[name], BuildOptions(scales=(0.25,), **options))
    stores = {k: SoftStore(v) for k, v in urls.items()}
    for i in range(len(stores["mmseg"].names())):
        assert np.array_equal(
            stores["mmseg"].read_rgb("1/4", i), stores["bilinear"].read_rgb("1/4", i)
        )
        assert not np.array_equal(
            stores["mmseg"].read_rgb("1/4", i), stores["nearest"].read_rgb("1/4", i)
        )
        for a, b in zip(
            stores["mmseg"].read_probs("1/4", i), stores["nearest"].read_probs("1/4", i)
        ):
            assert np.array_equal(a, b)
    assert stores["mmseg"].describe()["colour_kernel"] == "bilinear"
    assert stores["bilinear"].describe()["colour_kernel"] is None
    with pytest.raises(BuildError, match="colour_kernel: 'bilinear' -> 'bicubic'"):
        build(m, root, urls["mmseg"], BuildOptions((0.25,), "nearest", colour_kernel="bicubic"))


def test_jobs_auto_leaves_busy_cores_alone(monkeypatch):
    from softprep import build as build_module

    monkeypatch.setattr(build_module, "usable_cores", lambda: 2)
    for load, jobs in ((0.0, 2), (0.4, 2), (0.9, 1), (1.0, 1), (7.5, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert build_module.parse_jobs("auto") == jobs
    assert build_module.parse_jobs("3") == 3
    with pytest.raises(ValueError, match="positive number or auto"):
        build_module.parse_jobs("two")


def test_workers_are_forked_only_in_the_clis_own_thread_free_process(monkeypatch):
    """A user's process (no OWN_PROCESS) or one running another thread gets loky's fresh
    interpreters; the CLI's process, single-threaded, forks."""
    import threading

    from softprep import OWN_PROCESS
    from softprep.build import _may_fork

    monkeypatch.delenv(OWN_PROCESS, raising=False)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert not _may_fork()
    monkeypatch.setenv(OWN_PROCESS, "1")
    assert _may_fork() == sys.platform.startswith("linux")
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    assert not _may_fork()


def _cli_build(*args, record=None) -> subprocess.Popen:
    """``softprep build ARGS`` as its own process (the console script's ``main``); with
    ``record``, the type of each pool ``local_pool`` returns is appended to that file."""
    code = (
        "import sys\n"
        "import softprep.build as b\n"
        "real = b.local_pool\n"
        "def local_pool(jobs):\n"
        "    pool = real(jobs)\n"
        f"    open({str(record)!r}, 'a').write(type(pool).__name__ + '\\n')\n"
        "    return pool\n"
        "if len(sys.argv) > 1 and sys.argv[1] == '--record': b.local_pool = local_pool\n"
        "from softprep.cli import main\n"
        "sys.argv = ['softprep', *sys.argv[2:]]\n"
        "main()\n"
    )
    flag = "--record" if record else "--plain"
    return subprocess.Popen(
        [sys.executable, "-c", code, flag, "build", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _forked_children(pid: int) -> list[int]:
    """The children of ``pid`` that run its own command line (forked workers, not the
    resource tracker it also starts)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        own = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    forked = []
    for c in children:
        try:
            if Path(f"/proc/{c}/cmdline").read_bytes() == own:
                forked.append(int(c))
        except OSError:
            pass
    return forked


@pytest.mark.slow
def test_the_clis_forked_workers_build_what_one_job_builds(samples, tmp_path):
    """``softprep build --jobs 2`` (its own process: forked workers, checked) equals
    ``build(..., jobs=1)`` byte for byte, shards of several images included."""
    m = load_manifest("ade20k")
    a, b, record = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "pools"
    build(m, samples["ade20k"], str(a), BuildOptions(scales=(0.5, 0.25), short_side=128,
                                                     images_per_shard=4))  # fmt: skip
    p = _cli_build("ade20k", "--root", samples["ade20k"], "--out", b, "--scales", "1/2",
                   "1/4", "--short-side", 128, "--images-per-shard", 4, "--jobs", 2,
                   record=record)  # fmt: skip
    _, err = p.communicate(timeout=120)  # returns once no process holds its pipes
    assert p.returncode == 0, err
    assert record.read_text().split() == ["ProcessPoolExecutor"]
    assert_same_store(a, b)
    for shard in sorted(p.relative_to(a) for p in a.glob("levels/*/*/c.*")):
        assert (a / shard).read_bytes() == (b / shard).read_bytes(), shard


def _cityscapes_build(tmp_path, n=40):
    data = tmp_path / "cs"
    write_sample(load_manifest("cityscapes"), data, {"train": n}, (512, 1024), seed=4)
    return data, ["cityscapes", "--root", data, "--scales", "1/2", "--images-per-shard", 1,
                  "--jobs", 3]  # fmt: skip


def _wait_for_workers(p, count: int) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if len(children := _forked_children(p.pid)) >= count:
            return children
        time.sleep(0.02)
    raise AssertionError(f"no {count} workers: {p.communicate(timeout=60)}")


@pytest.mark.slow
@needs_fork
def test_forked_workers_die_with_the_build_process(tmp_path):
    """kill -9 of the build process while its forked workers are idle (started, never
    given a shard): they end too, at once, instead of living on holding its pipes."""
    pids = tmp_path / "pids"
    code = (
        "import os, signal, sys\n"
        f"os.environ[{OWN_PROCESS!r}] = '1'\n"
        "import softprep.build as b\n"
        "pool = b.local_pool(3)\n"
        "assert type(pool).__name__ == 'ProcessPoolExecutor', pool\n"
        "pool.submit(b._warm_up, b.BuildOptions(scales=(0.5,))).result()\n"
        f"open({str(pids)!r}, 'w').write(' '.join(map(str, pool._processes)))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    with open(tmp_path / "out", "w") as out:  # a pipe would wait for the workers too
        r = subprocess.run([sys.executable, "-c", code], stdout=out, stderr=out, timeout=60)
    assert r.returncode == -signal.SIGKILL, (tmp_path / "out").read_text()
    workers = [int(w) for w in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 5

    def alive(w: int) -> bool:
        try:  # gone, or a zombie awaiting its reaper
            return Path(f"/proc/{w}/stat").read_text().split(") ")[1][0] != "Z"
        except OSError:
            return False

    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [w for w in workers if alive(w)]
    for w in survivors:  # leave none behind, even when failing
        os.kill(w, signal.SIGKILL)
    assert not survivors, workers


@pytest.mark.slow
def test_a_killed_worker_is_one_sentence_and_the_build_resumes(tmp_path):
    """A worker killed mid-build (as the OOM killer does): exit 2 with one sentence that
    names the cause and the way on, no traceback; the same command then finishes."""

    data, args = _cityscapes_build(tmp_path)
    out = tmp_path / "s.zarr"
    p = _cli_build(*args, "--out", out)
    workers = _wait_for_workers(p, 2)
    time.sleep(0.3)
    os.kill(workers[0], signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("the build finished before the kill")
    assert p.returncode == 2 and "Traceback" not in err, err
    said = " ".join(err.split("error: ")[-1].split())  # unwrapped (80 columns when piped)
    assert said.startswith("a worker process was killed (out of memory?"), err
    assert said.endswith("run the same command to resume"), err
    p = _cli_build(*args, "--out", out)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err


def test_the_kernels_load_with_the_collector_paused(monkeypatch):
    """``_warm_up`` (each worker's first ~0.3 s) runs with garbage collection off, and leaves
    it on."""
    import gc

    import softprep.build as b

    seen = []
    monkeypatch.setattr(b, "strategy_masses", lambda *args: seen.append(gc.isenabled()))
    b._warm_up.__wrapped__(b.BuildOptions(scales=(0.5,)))  # not the once-per-process cache
    assert seen == [False] and gc.isenabled()
