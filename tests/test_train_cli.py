"""softtrain on the command line, and the paper's nearest-neighbour baseline end to end."""

import json

import pytest
from typer.testing import CliRunner

from softprep.build import BuildOptions, build
from softprep.manifest import load_manifest
from softprep.terminal import expand_multi_value
from softtrain.cli import MULTI_VALUE, app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, expand_multi_value([str(a) for a in args], MULTI_VALUE))
    result.text = " ".join(result.output.split())
    return result


@pytest.mark.slow
def test_fit_eval_predict_with_nearest_store_and_config_replay(samples, tmp_path):
    url = str(tmp_path / "nn.zarr")
    build(
        load_manifest("cityscapes"),
        samples["cityscapes"],
        url,
        BuildOptions(scales=(0.125, 0.25), kernel="nearest"),
    )
    out = tmp_path / "run"
    common = [
        "--model",
        "deeplabv3plus_r18",
        "--crop",
        "32x64",
        "--batch-size",
        2,
        "--workers",
        0,
        "--device",
        "cpu",
    ]
    r = run(
        "fit",
        "--store",
        url,
        "--levels",
        "1/8",
        "1/4",
        "--iters",
        2,
        "--accum",
        2,
        "--out",
        out,
        "--mc",
        "exclude",
        *common,
    )
    assert r.exit_code == 0, r.output
    assert "done: 2 steps" in r.text
    r = run(
        "fit", "--config", out / "config.toml", "--out", tmp_path / "replay", "--loss", "ce-hard"
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "replay/config.toml").read_text().count('loss = "ce-hard"') == 1
    r = run(
        "eval",
        "--store",
        url,
        "--checkpoint",
        out / "best.pt",
        "--device",
        "cpu",
        "--json",
        tmp_path / "iou.json",
    )
    assert r.exit_code == 0 and "mIoU" in r.text
    assert len(json.loads((tmp_path / "iou.json").read_text())["classes"]) == 19
    image = next((samples["cityscapes"] / "leftImg8bit/val").rglob("*.png"))
    r = run(
        "predict",
        image,
        "--checkpoint",
        out / "last.pt",
        "--out",
        tmp_path / "pred",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0 and len(list((tmp_path / "pred").glob("*.png"))) == 1


def test_bad_input_messages(tmp_path):
    r = run("fit", "--store", tmp_path / "none.zarr", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "no zarr store" in r.text
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start
    r = run("fit")
    assert r.exit_code == 2 and "give --store" in r.text
    r = run("fit", "--store", "x.zarr", "--loss", "dice")
    assert r.exit_code == 2 and "--loss 'dice': choose from soft, ce-hard" in r.text
