"""Manifests against the dataset facts in ../shared/datasets."""

import csv

import pytest

from softprep.manifest import VOID, ManifestError, load_manifest
from tests.conftest import FACTS, needs_facts


def rows(name):
    with open(FACTS / name) as f:
        return list(csv.DictReader(f, delimiter="\t"))


@needs_facts
def test_cityscapes_id_to_train_id_matches_official_table():
    m = load_manifest("cityscapes")
    for r in rows("cityscapes_labels.tsv"):
        i, t = int(r["id"]), int(r["trainId"])
        if i < 0:
            continue
        assert m.label_values[i] == (VOID if t in (-1, 255) else t), r["name"]
        if t not in (-1, 255):
            c = m.classes[t]
            assert c.name == r["name"]
            assert c.color == (int(r["color_r"]), int(r["color_g"]), int(r["color_b"]))
    assert m.num_classes == 19


@needs_facts
@pytest.mark.parametrize(
    "version,table,labels",
    [("v1.2", "mapillary_v1.2_labels.tsv", 66), ("v2.0", "mapillary_v2.0_classes_mmseg.tsv", 124)],
)
def test_mapillary_tables(version, table, labels):
    m = load_manifest("mapillary", version)
    facts = rows(table)
    assert len(facts) == labels == len(m.label_values)
    ignored = [int(r["id"]) for r in facts if "nlabeled" in (r.get("name") or r["readable"])]
    assert [raw for raw, t in m.label_values.items() if t == VOID] == ignored
    assert m.num_classes == labels - 1
    for r in facts:
        raw = int(r["id"])
        if m.label_values[raw] != VOID:
            c = m.classes[m.label_values[raw]]
            assert c.color == (int(r["r"]), int(r["g"]), int(r["b"]))


@needs_facts
def test_ade20k_reduce_zero_label():
    m = load_manifest("ade20k")
    facts = rows("ade20k_150_mmseg.tsv")
    assert m.num_classes == 150
    for r in facts:
        v, t = int(r["png_value"]), int(r["train_id_after_reduce_zero_label"])
        assert m.label_values[v] == (VOID if v == 0 else v - 1) == (VOID if t == 255 else t)
        if t != 255:
            assert m.classes[t].name == r["name"]


def test_default_version_and_errors():
    assert load_manifest("mapillary").version == "v1.2"
    with pytest.raises(ManifestError, match="unknown dataset"):
        load_manifest("pascal")
    with pytest.raises(ManifestError, match="no version"):
        load_manifest("mapillary", "v9")
    with pytest.raises(ManifestError, match="no label variant"):
        load_manifest("cityscapes", variant="colour")


def test_folder_manifest_from_path(tmp_path):
    from tests.conftest import REPO

    m = load_manifest(str(REPO / "manifests" / "folder-example.json"))
    assert m.dataset == "folder" and m.num_classes == 2
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"dataset": "x", "classes": [{"id": 1, "name": "a", "color": [0,0,0]}], "label_values": {}, "splits": {"train": "train"}, "layout": {}}'
    )
    with pytest.raises(ManifestError, match="class ids must be 0..C-1"):
        load_manifest(str(bad))


def test_pickled_manifest_leaves_its_lookup_table_behind():
    import pickle

    m = load_manifest("cityscapes")
    lut, valid = m.lookup_table  # cached on the instance: 128 KiB
    copy = pickle.loads(pickle.dumps(m))
    assert len(pickle.dumps(m)) < 10_000  # what every build task carries to a worker
    assert (
        copy == m and (copy.lookup_table[0] == lut).all() and (copy.lookup_table[1] == valid).all()
    )
