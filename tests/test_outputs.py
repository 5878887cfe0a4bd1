"""Machine-readable outputs: the columns and fields scripts rely on."""

import csv
import json

from typer.testing import CliRunner

from softprep.cli import app
from softtrain.cli import write_eval

runner = CliRunner()


def test_eval_csv_has_class_ids_like_the_priors_and_fidelity_csvs(tmp_path):
    record = {
        "mIoU": 0.5,
        "classes": [
            {"class": "road", "iou": 0.9, "acc": 0.95},
            {"class": "pole", "iou": None, "acc": None},
        ],
    }
    write_eval(record, tmp_path / "iou.csv", None)
    rows = list(csv.DictReader(open(tmp_path / "iou.csv")))
    assert list(rows[0]) == ["class_id", "class", "iou", "acc"]
    assert [(r["class_id"], r["class"]) for r in rows] == [("0", "road"), ("1", "pole")]


def test_scan_json(tmp_path):
    from softprep.manifest import load_manifest
    from softprep.sample import write_sample

    data = tmp_path / "cs"
    write_sample(load_manifest("cityscapes"), data, {"train": 2, "val": 1}, (32, 64))
    r = runner.invoke(app, ["scan", "cityscapes", "--root", str(data), "--json"])
    d = json.loads(r.stdout)
    assert r.exit_code == 0 and d["problems"] == []
    assert d["dataset"] == "cityscapes" and d["splits"]["train"] == {
        "pairs": 2,
        "sizes": {"32x64": 2},
    }
    assert [h["class_id"] for h in d["histogram"]] == [*range(19), 255]
    assert sum(h["pixels"] for h in d["histogram"]) == 3 * 32 * 64
    next((data / "gtFine/val").rglob("*_labelIds.png")).unlink()
    r = runner.invoke(app, ["scan", "cityscapes", "--root", str(data), "--json"])
    d = json.loads(r.stdout)
    assert r.exit_code == 1 and len(d["problems"]) == 1 and "path" in d["problems"][0]


def test_priors_plot_marks_exact_zeros_and_absent_classes(tmp_path, recwarn):
    """A |D| of exactly 0 gets a marker on the log axis (no bar can show it), an absent
    class a grey name; the layout holds (no matplotlib warning)."""
    import numpy as np
    from PIL import Image

    from softprep.priors import PriorReport

    original = np.array([0.5, 0.3, 0.2, 0.0])
    report = PriorReport(
        ["road", "pole", "sky", "rider"], "train", 3, original,
        {"1/8": {"soft": original - [1e-9, -1e-9, 0, 0], "nn": original - [0.01, 0, -0.01, 0]}},
    )  # fmt: skip
    report.plot(tmp_path / "p.png")
    assert not [w for w in recwarn if "layout" in str(w.message)]
    assert Image.open(tmp_path / "p.png").size[0] > 800


def test_show_by_name_with_a_title_panels_and_a_colour_key(tmp_path):
    from PIL import Image

    from softprep.build import BuildOptions, build
    from softprep.manifest import load_manifest
    from softprep.render import render
    from softprep.sample import write_sample
    from softprep.store import SoftStore

    m = load_manifest("cityscapes")
    write_sample(m, tmp_path / "cs", {"train": 1, "val": 1}, (64, 128))
    url = str(tmp_path / "s.zarr")
    build(m, tmp_path / "cs", url, BuildOptions(scales=(0.25,)))
    store = SoftStore(url)
    train, val = (str(n) for n in store.names())
    r = runner.invoke(app, ["show", url, "--name", val, "--level", "1/4",
                            "--out", str(tmp_path / "v.png")])  # fmt: skip
    assert r.exit_code == 0 and val in r.stdout, r.output
    one = 128 // 4 * 12  # panels are zoomed to >= 384 px
    assert Image.open(tmp_path / "v.png").width == 4 * one + 3 * 10  # + nearest neighbour
    assert render(store, 0, "1/4").width == 3 * one + 2 * 10  # training: no full label
    short = val.rsplit("/", 1)[-1]
    r = runner.invoke(app, ["show", url, "--name", short, "--level", "1/4",
                            "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert r.exit_code == 0 and val in r.stdout, r.output  # unique: the last part will do
    for path in sorted((tmp_path / "cs").rglob("val/frankfurt/*")):  # a name in both splits
        path.parent.with_name("aachen").mkdir(exist_ok=True)
        path.rename(path.parent.with_name("aachen") / path.name.replace("frankfurt", "aachen"))
    build(m, tmp_path / "cs", str(tmp_path / "twice.zarr"), BuildOptions(scales=(0.25,)))
    r = runner.invoke(app, ["show", str(tmp_path / "twice.zarr"), "--name", short.replace(
        "frankfurt", "aachen"), "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert r.exit_code == 2 and "2 images are called" in r.output, r.output
    assert "give the full name, with its split" in " ".join(r.output.split())
    r = runner.invoke(app, ["show", url, "--name", "nope", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "no image called nope" in r.output


def test_prediction_overlays_carry_a_colour_key():
    import numpy as np

    from softprep.manifest import load_manifest
    from softtrain.predict import overlay

    m = load_manifest("cityscapes")
    palette = np.zeros((256, 3), np.uint8)
    palette[: m.num_classes] = m.palette
    pred = np.zeros((60, 400), np.uint8)
    pred[:, 200:] = 5  # road | pole
    im = overlay(np.full((60, 400, 3), 128, np.uint8), pred, palette, m.class_names)
    assert im.size == (400, 60 + 4 + 22)  # one row of the key: road, pole
    key = np.asarray(im)[64:]
    assert (key == m.palette[0]).all(axis=-1).any() and (key == m.palette[5]).all(axis=-1).any()


def test_compare_shows_no_spread_for_one_seed_and_plots_fidelity_as_bars(tmp_path, recwarn):
    import numpy as np

    from softtrain.cli import miou_cell
    from softtrain.compare import CompareReport

    assert miou_cell({"mIoU_mean": 0.471, "mIoU_std": 0.0, "seeds": 1}) == "47.1"
    assert miou_cell({"mIoU_mean": 0.471, "mIoU_std": 0.008, "seeds": 3}) == "47.1 ± 0.8"
    iou = [np.array([0.9, 0.1, np.nan])]
    report = CompareReport(["road", "pole", "rider"], "1/4", ["nn", "soft"], [0],
                           {"nn": [0.41], "soft": [0.47]}, {"nn": iou, "soft": iou},
                           {"nn": 0.7, "soft": 0.8})  # fmt: skip
    report.plot(tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert not [w for w in recwarn if "layout" in str(w.message)]
