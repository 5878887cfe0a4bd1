"""softtrain compare: a tiny comparison over two stores and two seeds on the CPU writes the
table from the runs' own final evaluations, and a second call retrains nothing."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from softprep.build import BuildOptions, build
from softprep.fidelity import from_store
from softprep.manifest import load_manifest
from softprep.store import SoftStore
from softprep.terminal import expand_multi_value
from softtrain.cli import MULTI_VALUE, app
from softtrain.compare import Arm
from softtrain.runlog import read_metrics
from tests.tinynet import TINY


@pytest.fixture(scope="module")
def stores(samples, tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    urls = {}
    for kernel in ("bilinear", "nearest"):
        urls[kernel] = str(base / f"{kernel}.zarr")
        build(load_manifest("cityscapes"), samples["cityscapes"], urls[kernel],
              BuildOptions(scales=(0.125,), kernel=kernel))  # fmt: skip
    return urls


def test_arm_parsing():
    assert Arm.parse("a.zarr") == Arm("a.zarr", "soft", "include")
    assert Arm.parse("a.zarr:ce-hard:exclude") == Arm("a.zarr", "ce-hard", "exclude")
    assert Arm.parse("s3://bucket/a.zarr:ce-hard") == Arm("s3://bucket/a.zarr", "ce-hard")
    assert Arm.parse("a.zarr:ce-hard:exclude").name == "a-ce-hard-mc-excluded"


@pytest.mark.slow
def test_tiny_compare_writes_the_table_and_does_not_retrain(stores, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--arm", stores["bilinear"], stores["nearest"], "--seeds", "0", "1",
            "--model", TINY, "--crop", "32x64", "--batch-size", "2", "--iters", "2",
            "--workers", "0", "--device", "cpu", "--out", str(out)]  # fmt: skip
    runner = CliRunner()
    r = runner.invoke(app, expand_multi_value(args, MULTI_VALUE, app))
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "compare.json").read_text())
    rows = {row["arm"]: row for row in doc["rows"]}
    assert set(rows) == {"bilinear-soft", "nearest-soft"}
    for arm, url in (("bilinear-soft", stores["bilinear"]), ("nearest-soft", stores["nearest"])):
        finals = [
            [x for x in read_metrics(out / arm / f"seed{s}/metrics.jsonl") if x["type"] == "eval"][
                -1
            ]
            for s in (0, 1)
        ]
        assert all(f["step"] == 2 for f in finals)
        mious = [f["mIoU"] for f in finals]
        assert rows[arm]["mIoU_mean"] == pytest.approx(np.mean(mious))
        assert rows[arm]["mIoU_std"] == pytest.approx(np.std(mious))
        fidelity = from_store(SoftStore(url), [], "val").miou("1/8", "soft")
        assert rows[arm]["fidelity_mIoU"] == pytest.approx(fidelity)
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    stamp = (out / "bilinear-soft/seed0/last.pt").stat().st_mtime_ns
    r = runner.invoke(app, expand_multi_value(args, MULTI_VALUE, app))
    assert r.exit_code == 0 and r.output.count("done:") == 4, r.output
    assert (out / "bilinear-soft/seed0/last.pt").stat().st_mtime_ns == stamp


def test_compare_refuses_eval_split_none_before_training(stores, tmp_path):
    from softtrain.compare import compare
    from softtrain.config import FitConfig

    base = FitConfig.of(store=stores["bilinear"], iters=2, device="cpu", eval_split="none")
    with pytest.raises(ValueError, match="--eval-split none: compare scores every run on it"):
        compare(base, [Arm.parse(stores["bilinear"])], [0], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
