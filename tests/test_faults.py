"""Nothing lost, nothing silently wrong: bad files named alike with one or two jobs, lossy
and oversized files refused, folders reported, manifests validated, crashes and full disks
resumable, one writer per store, workers that end with their build, damage found by verify
and refused by softtrain."""

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from softprep import layout as layout_module
from softprep import writer as writer_module
from softprep.build import BuildError, BuildOptions, build
from softprep.datasets import discover
from softprep.manifest import ManifestError, load_manifest
from softprep.sample import write_sample
from softprep.store import SoftStore, StoreError
from softprep.verify import verify
from softprep.writer import writer_lock
from softtrain.data import CropDataset
from tests.test_build import assert_same_store

CS = load_manifest("cityscapes")
OPTS = BuildOptions(scales=(0.125,), images_per_shard=2)  # 6 sample images: 3 shards


def header_only_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` pixels, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def damage(samples, tmp_path, kinds=("truncated", "rgb", "jpeg", "values")):
    """A Cityscapes sample with bad training pairs; returns (root, {path: expected reason})."""
    root = tmp_path / "cs"
    shutil.copytree(samples["cityscapes"], root)
    images = sorted((root / "leftImg8bit/train").rglob("*.png"))
    labels = [
        Path(str(p).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit", "_gtFine_labelIds"))
        for p in images
    ]
    bad = {}
    if "truncated" in kinds:  # a broken download
        images[0].write_bytes(images[0].read_bytes()[:2000])
        bad[str(images[0])] = "cannot decode image"
    if "rgb" in kinds:  # a colour label
        Image.open(labels[1]).convert("RGB").save(labels[1])
        bad[str(labels[1])] = "RGB label"
    if "jpeg" in kinds:  # lossy, under a .png name
        Image.open(labels[2]).save(labels[2], format="JPEG")
        bad[str(labels[2])] = "label is a JPEG file"
    if "values" in kinds:  # not a Cityscapes label id
        arr = np.asarray(Image.open(labels[3])).copy()
        arr[0, 0] = 250
        Image.fromarray(arr).save(labels[3])
        bad[str(labels[3])] = "label values [250] are not defined"
    return root, bad


def named(error: Exception, bad: dict) -> bool:
    """Whether a line of the error starts with a bad file's path and gives its reason."""
    lines = [line.strip() for line in str(error).splitlines()]
    return any(
        line.startswith(f"{path}: ") and reason in line
        for line in lines
        for path, reason in bad.items()
    )


@pytest.mark.parametrize("kind", ["truncated", "rgb", "values"])
def test_bad_file_in_a_worker_is_named_with_two_jobs(samples, tmp_path, kind):
    root, bad = damage(samples, tmp_path, (kind,))
    with pytest.raises(BuildError) as failed:
        build(CS, root, str(tmp_path / "s.zarr"), OPTS, jobs=2)
    assert named(failed.value, bad), str(failed.value)


@pytest.mark.parametrize("jobs", [1, 2])
def test_bad_files_named_alike_with_one_and_two_jobs(samples, tmp_path, jobs):
    root, bad = damage(samples, tmp_path)
    url = str(tmp_path / "s.zarr")
    with pytest.raises(BuildError) as failed:
        build(CS, root, url, OPTS, jobs=jobs)
    assert named(failed.value, bad), str(failed.value)
    summary = build(CS, root, url, OPTS, jobs=jobs, on_error="skip")
    got = {p.path: p.message for p in summary.skipped}
    assert set(got) == set(bad)
    assert all(reason in got[path] for path, reason in bad.items())
    assert verify(SoftStore(url)).ok


def test_a_skipped_image_fixed_later_rewrites_its_shard(samples, tmp_path):
    """A skipped image shares its shard with a built one: once the file is fixed, the same
    command rewrites that shard whole, and the store equals a clean build."""
    root, bad = damage(samples, tmp_path, ("truncated",))
    url, reference = str(tmp_path / "s.zarr"), str(tmp_path / "ref.zarr")
    build(CS, root, url, OPTS, on_error="skip")
    assert SoftStore(url).done().sum() == 5 and verify(SoftStore(url)).ok
    broken = Path(next(iter(bad)))
    shutil.copy(samples["cityscapes"] / broken.relative_to(root), broken)
    summary = build(CS, root, url, OPTS)
    assert (summary.built, summary.already_done) == (2, 4)
    build(CS, samples["cityscapes"], reference, OPTS)
    assert_same_store(url, reference)
    assert verify(SoftStore(url)).ok


def test_a_stopped_build_counts_as_saved_only_what_the_resume_keeps(samples, tmp_path):
    """On a bad file the build stops; the images it says are saved are those the resume
    does not build again (not the bad image's shard-mate, rewritten with its shard)."""
    root, bad = damage(samples, tmp_path, ("truncated",))
    url = str(tmp_path / "s.zarr")
    with pytest.raises(BuildError, match=r"stopped; (\d+) image\(s\) finished") as failed:
        build(CS, root, url, OPTS)
    saved = int(re.search(r"stopped; (\d+) image", str(failed.value)).group(1))
    assert saved == SoftStore(url).done().sum()
    broken = Path(next(iter(bad)))
    shutil.copy(samples["cityscapes"] / broken.relative_to(root), broken)
    summary = build(CS, root, url, OPTS)
    assert (summary.built, summary.already_done) == (6 - saved, saved)


def test_oversized_header_is_refused_by_name(samples, tmp_path):
    root = tmp_path / "cs"
    shutil.copytree(samples["cityscapes"], root)
    image = sorted((root / "leftImg8bit/val").rglob("*.png"))[0]
    header_only_png(image, 50000, 50000)
    summary = build(CS, root, str(tmp_path / "s.zarr"), OPTS, on_error="skip")
    assert [p.path for p in summary.skipped] == [str(image)]
    assert "50000x50000 (2500 MP), above the 250 MP limit" in summary.skipped[0].message


def test_symlinked_folders_followed_and_broken_links_reported(samples, tmp_path, caplog):
    root = tmp_path / "cs"
    shutil.copytree(samples["cityscapes"], root)
    before, _ = discover(CS, root)
    city = next((root / "leftImg8bit/train").iterdir())
    elsewhere = tmp_path / "elsewhere"
    shutil.move(city, elsewhere)
    city.symlink_to(elsewhere, target_is_directory=True)  # a city folder on another disk
    (city / "loop").symlink_to(city, target_is_directory=True)  # a folder loop
    looping = root / "leftImg8bit/val" / next((root / "leftImg8bit/val").iterdir()).name
    (looping / "x_leftImg8bit.png").symlink_to(looping / "x_leftImg8bit.png")
    with caplog.at_level("WARNING", logger="softprep"):
        pairs, problems = discover(CS, root)
    assert f"following the symlinked folder {city} -> {elsewhere}" in caplog.text
    assert [p.name for p in pairs] == [p.name for p in before]
    text = "\n".join(map(str, problems))
    assert "x_leftImg8bit.png: broken or looping symlink" in text
    assert "symlink loop" in text


def test_unreadable_folder_is_reported(samples, tmp_path, monkeypatch):
    root = tmp_path / "cs"
    shutil.copytree(samples["cityscapes"], root)
    city = next((root / "gtFine/train").iterdir())
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == city:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root reads any folder: simulate chmod 000
    _, problems = discover(CS, root)
    text = "\n".join(map(str, problems))
    assert f"{city}: folder cannot be read (Permission denied)" in text


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m["classes"][0].pop("color"), "classes[0] (road) has no color"),
        (lambda m: m.update(label_values={"abc": 0}), "label_values key 'abc' must be an integer"),
        (
            lambda m: m.update(label_values={"70000": 0}),
            "key '70000' must be an integer in 0..65535",
        ),
        (lambda m: m.update(splits={}), "'splits' must be a non-empty object"),
        (lambda m: m.pop("splits"), "missing field 'splits'"),
        (lambda m: m.update(classes={"road": 0}), "'classes' must be a list"),
        (lambda m: m["layout"].update(images="../elsewhere/{split}"), "inside the root"),
        (lambda m: m["splits"].update(train="../../etc"), "inside the root"),
        (
            lambda m: m.update(image_only_splits=["extra"]),
            "'image_only_splits' names splits not in 'splits': ['extra']",
        ),
        (
            lambda m: m.update(image_only_splits=["val"]),
            "splits ['val'] cannot be evaluated: they are image-only",
        ),
    ],
)
def test_manifest_problems_named_with_the_file(tmp_path, change, message):
    raw = json.loads(Path(CS.source).read_text())
    change(raw)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=str(path)) as e:
        load_manifest(str(path))
    assert message in str(e.value)


def test_interrupted_store_creation_resumes(samples, tmp_path, monkeypatch):
    url = str(tmp_path / "s.zarr")

    async def fail_half_way(writes):
        writes = list(writes)
        for write in writes[: len(writes) // 2]:
            await write
        for write in writes[len(writes) // 2 :]:
            write.close()
        raise OSError(errno.EIO, "Input/output error")  # the disk fails while creating

    monkeypatch.setattr(layout_module, "_all", fail_half_way)  # store creation
    with pytest.raises(BuildError, match="writing failed"):
        build(CS, samples["cityscapes"], url, OPTS)
    monkeypatch.undo()
    assert Path(url, "images/name/zarr.json").is_file()  # some arrays were created
    with pytest.raises(StoreError, match="not a softprep store"):
        SoftStore(url)
    build(CS, samples["cityscapes"], url, OPTS)  # the same command finishes it
    assert verify(SoftStore(url)).ok


def test_full_disk_is_one_message_and_the_build_resumes(samples, tmp_path, monkeypatch):
    url = str(tmp_path / "s.zarr")
    real, calls = writer_module.ImageWriter.write, {"n": 0}

    def disk_fills(self, *args):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(writer_module.ImageWriter, "write", disk_fills)
    with pytest.raises(BuildError, match="no space left on the device.*run the same command"):
        build(CS, samples["cityscapes"], url, OPTS)
    assert SoftStore(url).done().sum() == 4  # the 2 shards written before are kept
    monkeypatch.setattr(writer_module.ImageWriter, "write", real)
    reference = str(tmp_path / "ref.zarr")
    build(CS, samples["cityscapes"], url, OPTS)
    build(CS, samples["cityscapes"], reference, OPTS)
    assert_same_store(url, reference)


@pytest.mark.slow
def test_one_writer_per_store_and_a_crashed_holder_frees_it(samples, tmp_path):
    url = str(tmp_path / "s.zarr")
    with writer_lock(url):
        with pytest.raises(StoreError, match="another softprep build is writing this store"):
            build(CS, samples["cityscapes"], url, OPTS)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"from softprep.writer import writer_lock\nwith writer_lock({url!r}):\n"
         "    print('locked', flush=True)\n    import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(StoreError, match=f"pid {holder.pid}"):
        build(CS, samples["cityscapes"], url, OPTS)
    holder.kill()
    holder.wait()
    build(CS, samples["cityscapes"], url, OPTS)
    assert SoftStore(url).done().all()
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # the lock file went with it


def test_a_store_name_at_the_file_system_limit_builds(samples, tmp_path):
    url = str(tmp_path / ("n" * 250 + ".zarr"))  # 255 bytes: its lock's name would be longer
    build(CS, samples["cityscapes"], url, OPTS)
    assert SoftStore(url).done().all()
    assert [p.name for p in tmp_path.iterdir()] == [Path(url).name]


def test_a_lock_file_taken_over_after_its_holder_removed_it(tmp_path):
    from softprep.lockfile import LockBusy, LockFile

    path = tmp_path / ".x.lock"
    first = LockFile(path).acquire()
    with pytest.raises(LockBusy) as busy:
        LockFile(path).acquire()
    assert busy.value.holder == str(os.getpid())
    first.release()
    assert not path.exists()
    with LockFile(path) as again:  # a new file, held
        assert path.read_text() == str(os.getpid())
        with pytest.raises(LockBusy):
            LockFile(path).acquire()
    assert again.fd is None and not path.exists()


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_kill_9_mid_build_workers_end_and_resume_equals_uninterrupted(tmp_path):
    root = tmp_path / "cs"
    write_sample(CS, root, {"train": 24, "val": 2}, size=(512, 1024), seed=3)
    url, reference = str(tmp_path / "s.zarr"), str(tmp_path / "ref.zarr")
    cmd = [sys.executable, "-m", "softprep", "build", "cityscapes", "--root", str(root),
           "--scales", "1/8", "1/4", "--out", url, "--jobs", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        shards = list(Path(url, "levels/x0.25/soft").glob("c.*"))
        if len(shards) >= 2:  # of 7 shards (4 images each)
            break
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.05)
    workers = [p for p in children_of(proc.pid) if alive(p)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not SoftStore(url).done().all(), "killed too late to test a resume"
    deadline = time.time() + 15
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if alive(p)], "workers outlived their build"
    build(CS, root, url, BuildOptions(scales=(0.125, 0.25)))
    build(CS, root, reference, BuildOptions(scales=(0.125, 0.25)))
    assert_same_store(url, reference)


@pytest.fixture
def built(samples, tmp_path):
    url = str(tmp_path / "s.zarr")
    build(CS, samples["cityscapes"], url, BuildOptions(scales=(0.125, 0.25), images_per_shard=2))
    assert verify(SoftStore(url)).ok
    return url


@pytest.mark.parametrize("array", ["levels/x0.25/soft", "levels/x0.125/rgb", "full/label"])
def test_deleted_shard_found_by_verify_and_refused_by_softtrain(built, array):
    s = SoftStore(built)
    i = int(np.flatnonzero(s.split_of() == ("val" if array == "full/label" else "train"))[0])
    Path(built, s.shard_key(array, i)).unlink()
    report = verify(SoftStore(built))
    assert f"{s.names()[i]}: data missing in {array}" in report.problems
    split = "val" if array == "full/label" else "train"
    with pytest.raises(StoreError, match=f"no data in {array}"):
        CropDataset(built, (32, 32), split) if split == "train" else __import__(
            "softtrain.data", fromlist=["EvalDataset"]
        ).EvalDataset(built, "1/8", "val")


def test_bit_flip_inside_a_shard_is_caught(built):
    shard = Path(built, SoftStore(built).shard_key("levels/x0.25/soft", 1))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10  # one bit, inside a compressed chunk
    shard.write_bytes(bytes(data))
    text = "\n".join(verify(SoftStore(built)).problems)
    assert "at 1/4: unreadable" in text


def test_changed_statistic_is_caught(built):
    root = zarr.open_group(built, mode="r+")
    stats = root["levels/x0.125/stats/soft"]
    row = stats[2]
    row[0] += 1000
    stats[2] = row
    text = "\n".join(verify(SoftStore(built)).problems)
    assert "at 1/8: 'soft' statistics add up to" in text


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("k", 4, "attribute 'k' is 4 but the build recorded 6"),
        ("kernel", "nearest", "attribute 'kernel' is 'nearest' but the build recorded 'bilinear'"),
        ("scales", [0.125, 0.5], "attribute 'scales'"),
    ],
)
def test_changed_attribute_is_caught(built, key, value, message):
    root = zarr.open_group(built, mode="r+")
    meta = dict(root.attrs["softprep"])
    meta[key] = value
    root.attrs["softprep"] = meta
    assert message in "\n".join(verify(SoftStore(built)).problems)


def test_missing_array_metadata_is_a_problem_not_a_traceback(built):
    Path(built, "images/done/zarr.json").unlink()
    report = verify(SoftStore(built))
    assert "images/done: array missing" in report.problems


# Decoding is faithful or refused: every bit depth and mode of a colour image maps to 8-bit
# RGB by its true bit depth (oracle: numpy ``>> 8`` of the 16-bit samples) or is refused.


def png16(path: Path, samples: np.ndarray) -> None:
    """A PNG of 16-bit samples written by hand (PIL writes no 16-bit colour PNGs):
    ``samples`` (H, W) grey, (H, W, 2) grey + alpha, (H, W, 3) RGB or (H, W, 4) RGBA."""
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[1 if samples.ndim == 2 else samples.shape[2]]
    h, w = samples.shape[:2]
    big = samples.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + big[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )  # fmt: skip


def sixteen_bit(shape, seed=0) -> np.ndarray:
    """uint16 samples over the whole range (a 16-bit photo: most values above 255)."""
    return np.random.default_rng(seed).integers(0, 65536, shape).astype(np.uint16)


def grey_as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.mark.parametrize(
    "kind", ["grey16-pil", "grey16-tiff", "grey16", "grey-alpha16", "rgb48", "rgba64"]
)
def test_16_bit_images_keep_their_high_byte(tmp_path, kind):
    from softprep.datasets import decode_image

    data = sixteen_bit((12, 20, {"grey-alpha16": 2, "rgb48": 3, "rgba64": 4}.get(kind, 1)))
    data = data[..., 0] if data.shape[2] == 1 else data
    path = tmp_path / ("x.tif" if kind == "grey16-tiff" else "x.png")
    if kind in ("grey16-pil", "grey16-tiff"):
        Image.fromarray(data).save(path)  # PIL writes mode I;16
        assert Image.open(path).mode.startswith("I;16")
    else:
        png16(path, data)
    expected = (data >> 8).astype(np.uint8)
    expected = grey_as_rgb(expected) if data.ndim == 2 else expected
    expected = grey_as_rgb(expected[..., 0]) if kind == "grey-alpha16" else expected[..., :3]
    np.testing.assert_array_equal(decode_image(path), expected)


def test_mode_i_from_a_png_is_16_bit(tmp_path):
    """Pillow before 10.? opened 16-bit grey PNGs as mode I: the same high byte."""
    from softprep.datasets import _to_rgb

    data = sixteen_bit((6, 9))
    im = Image.fromarray(data.astype(np.int32))
    im.format = "PNG"
    np.testing.assert_array_equal(np.asarray(_to_rgb(im, tmp_path)), grey_as_rgb(data >> 8))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_low_bit_grey_and_8_bit_modes_still_work(tmp_path, bits):
    from softprep.datasets import decode_image

    values = np.random.default_rng(bits).integers(0, 2**bits, (7, 13)).astype(np.uint8)
    grey = Image.fromarray(values.astype(bool)) if bits == 1 else Image.fromarray(values)
    grey.save(tmp_path / "x.png", bits=bits)  # PIL writes 1, 2 and 4-bit grey PNGs
    expected = grey_as_rgb(values * (255 // (2**bits - 1)))
    np.testing.assert_array_equal(decode_image(tmp_path / "x.png"), expected)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 13, 3), np.uint8))
    for mode, name in [("P", "p.png"), ("LA", "la.png"), ("RGBA", "rgba.png"), ("CMYK", "c.tif")]:
        rgb.convert(mode).save(tmp_path / name)
        np.testing.assert_array_equal(
            decode_image(tmp_path / name), np.asarray(rgb.convert(mode).convert("RGB"))
        )


@pytest.mark.parametrize("mode", ["F", "I"])
def test_images_of_unknown_range_are_refused_by_name(samples, tmp_path, mode):
    from softprep.datasets import DatasetError, decode_image

    data = np.linspace(0, 3, 60, dtype=np.float32).reshape(6, 10)
    path = tmp_path / "x.tif"
    Image.fromarray(data if mode == "F" else (data * 1e6).astype(np.int32)).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(DatasetError, match=f"{path}: .*mode {mode}.* value range is unknown"):
        decode_image(path)


def test_48_bit_dataset_image_builds_as_its_high_byte(samples, tmp_path):
    """A labelled image saved as 48-bit RGB (its 8-bit pixels as the high byte, noise in
    the low byte) builds the same store as the 8-bit original."""
    root = tmp_path / "cs"
    shutil.copytree(samples["cityscapes"], root)
    image = sorted((root / "leftImg8bit/train").rglob("*.png"))[1]
    rgb = np.asarray(Image.open(image).convert("RGB")).astype(np.uint16)
    png16(image, (rgb << 8) | sixteen_bit(rgb.shape, seed=5) & 0xFF)
    assert Image.open(image).mode == "RGB"  # PIL's own truncation of 16-bit samples
    url, reference = str(tmp_path / "s.zarr"), str(tmp_path / "ref.zarr")
    build(CS, root, url, OPTS)
    build(CS, samples["cityscapes"], reference, OPTS)
    assert_same_store(url, reference)


def test_16_bit_grey_unlabeled_image_builds_as_its_high_byte(samples, tmp_path):
    """``--unlabeled`` with a 16-bit grey PNG (the photo most of whose values are above
    255) equals the build from the same image reduced to 8 bits by ``>> 8``, not clipped."""
    grey = sixteen_bit((48, 80), seed=2)
    sixteen, eight = tmp_path / "u16", tmp_path / "u8"
    sixteen.mkdir()
    eight.mkdir()
    Image.fromarray(grey).save(sixteen / "a.png")  # mode I;16
    Image.fromarray((grey >> 8).astype(np.uint8)).save(eight / "a.png")
    stores = []
    for folder in (sixteen, eight):
        opts = BuildOptions(scales=(0.5,), splits=("val",), unlabeled=str(folder))
        stores.append(str(tmp_path / f"{folder.name}.zarr"))
        build(CS, samples["cityscapes"], stores[-1], opts)
    assert_same_store(*stores)
    s = SoftStore(stores[0])
    i = list(s.names()).index("unlabeled/a")
    assert (s.read_rgb("1/2", i) == 255).mean() < 0.05  # was 97.5% white when clipped


@pytest.mark.parametrize("bits", [2, 4])
def test_low_bit_grey_labels_are_read_as_their_values(tmp_path, bits):
    """A 2 or 4-bit grey label PNG holds class ids 0..3 / 0..15; PIL scales them to
    0..255 (1 -> 85 / 17), the decoder takes them back."""
    from softprep.datasets import decode_label

    ade = load_manifest("ade20k")
    values = np.random.default_rng(bits).integers(0, 2**bits, (9, 14)).astype(np.uint8)
    Image.fromarray(values).save(tmp_path / "low.png", bits=bits)
    Image.fromarray(values).save(tmp_path / "eight.png")
    assert Image.open(tmp_path / "low.png").tile[0].args == f"L;{bits}"
    np.testing.assert_array_equal(
        decode_label(tmp_path / "low.png", ade), decode_label(tmp_path / "eight.png", ade)
    )
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "sixteen.png")
    with pytest.raises(Exception, match="16/32-bit"):  # 16-bit labels stay refused
        decode_label(tmp_path / "sixteen.png", ade)


def test_predict_decodes_16_bit_inputs_and_refuses_float_ones(tmp_path, monkeypatch):
    """``softtrain predict`` reads inputs through the same decoder (a stand-in model: a
    1x1 convolution, so the output follows the colour)."""
    import torch

    from softprep.datasets import DatasetError
    from softtrain import predict as predict_module
    from softtrain import segmenter as segmenter_module

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1).eval()
    fake = {
        "config": {"crop": "32x32"},
        "eval_level": "1/2",
        "store_meta": {"manifest": CS.to_json(), "short_side": None, "kernel": "bilinear",
                       "antialias": True},
    }  # fmt: skip
    monkeypatch.setattr(segmenter_module, "load_checkpoint", lambda path: fake)
    monkeypatch.setattr(segmenter_module, "model_from_checkpoint", lambda ckpt, device: model)
    grey = sixteen_bit((24, 40), seed=3)
    (tmp_path / "in16").mkdir()
    (tmp_path / "in8").mkdir()
    Image.fromarray(grey).save(tmp_path / "in16/a.png")
    Image.fromarray((grey >> 8).astype(np.uint8)).save(tmp_path / "in8/a.png")
    out = {}
    for name in ("in16", "in8"):
        (written,) = predict_module.predict("x.pt", [tmp_path / name], tmp_path / f"o{name}")
        out[name] = np.asarray(Image.open(written))
    np.testing.assert_array_equal(out["in16"], out["in8"])
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DatasetError, match="f.tif: floating-point image"):
        predict_module.predict("x.pt", [tmp_path / "f.tif"], tmp_path / "of")
