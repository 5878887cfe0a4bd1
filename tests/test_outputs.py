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
