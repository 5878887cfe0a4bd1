"""softtrain on the command line, and the paper's nearest-neighbour baseline end to end."""

import json
import subprocess
import sys

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
        tmp_path / "metrics[1]" / "iou.json",  # a missing folder is made; brackets kept
    )
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "metrics[1]/iou.json").read_text())
    assert len(record["classes"]) == 19
    assert f"{out / 'best.pt'} on {url} (val, 1/4, whole)\n" in r.output  # whole, one line
    table, wrote = r.output.split("\nwrote ")
    assert table.splitlines()[-1].startswith(f"mIoU {100 * record['mIoU']:.2f}  aAcc")
    assert "".join(wrote.split()) == str(tmp_path / "metrics[1]" / "iou.json")
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
    assert f"wrote 1 label PNG (trainIds) to {tmp_path / 'pred'}" in r.output


def test_bad_input_messages(tmp_path):
    r = run("fit", "--store", tmp_path / "none.zarr", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "no zarr store" in r.text
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start
    r = run("fit")
    assert r.exit_code == 2 and "give --store" in r.text
    r = run("fit", "--store", "x.zarr", "--loss", "dice")
    assert r.exit_code == 2 and "--loss 'dice': choose from soft, ce-hard" in r.text


def test_device_eval_split_and_version_are_one_line_before_anything_is_written(tmp_path, samples):
    url = str(tmp_path / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.125,)))
    base = [
        "fit",
        "--store",
        url,
        "--out",
        str(tmp_path / "run"),
        "--model",
        "deeplabv3plus_r18",
        "--batch-size",
        "2",
    ]
    for extra, why in [
        (["--device", "cuda:7"], "device 'cuda:7': "),
        (["--device", "gpu"], "device 'gpu': not a device name"),
        (
            ["--eval-split", "vall"],
            "--eval-split vall: .* has no such split; its evaluation split\\(s\\): val",
        ),
    ]:
        r = runner.invoke(app, base + extra)
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert __import__("re").search(why, r.output), r.output
        assert not (tmp_path / "run").exists()
    r = subprocess.run(  # argument errors answer before torch is imported (-X importtime
        # lists every module imported, on stderr)
        [sys.executable, "-X", "importtime", "-m", "softtrain", "fit", "--loss", "dice",
         "--store", url],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "--loss 'dice'" in r.stderr, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert "softtrain.config" in imported and "torch" not in imported
    for prog in ("softprep", "softtrain"):
        r = subprocess.run(
            [sys.executable, "-m", prog, "--version"], capture_output=True, text=True
        )
        assert r.returncode == 0 and r.stdout.strip() == f"{prog} 0.1.0"


@pytest.mark.slow  # trains for seconds: keeps the fast tier under a minute
def test_the_banner_says_what_a_run_uses_and_best_pt_has_no_optimiser(tmp_path, samples):
    from softtrain.checkpoint import load_checkpoint
    from softtrain.config import FitConfig
    from softtrain.fit import fit
    from softtrain.runlog import read_metrics

    url = str(tmp_path / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.125,)))
    said = []
    cfg = FitConfig.of(
        store=url,
        out=str(tmp_path / "run"),
        model="deeplabv3plus_r18",
        crop="64x128",
        batch_size=2,
        iters=2,
        workers=0,
        device="cpu",
    )
    fit(cfg, on_start=said.extend)
    text = "\n".join(said)
    assert "supervised training of deeplabv3plus_r18 (16.6 M parameters) on cpu" in text
    assert "crops 64x128 (height x width) from levels 1/8, whose images are up to 32x64" in text
    assert "1/8 (75% of each crop is void padding)" in text  # 32x64 of 64x128
    best, last = (load_checkpoint(tmp_path / f"run/{n}.pt") for n in ("best", "last"))
    assert "optimizer" not in best and "optimizer" in last
    records = [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if r["type"] == "train"]
    assert records and all(r["peak_memory_gib"] is None for r in records)  # CPU: no figure


def test_bench_loader_says_when_crops_are_mostly_padding(samples, tmp_path):
    """As fit's banner does: the sample's 1/8 level is 32x64, so 64x128 crops are 75% void."""
    url = str(tmp_path / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.125,)))
    common = ["--store", url, "--workers", 0, "--batch-size", 2, "--batches", 2]
    r = run("bench-loader", *common, "--crop", "64x128")
    assert r.exit_code == 0 and "crops/s (in this process)" in r.text, r.output
    assert "note: the crop is larger than the images at 1/8 (75% of each crop is void" in r.text
    r = run("bench-loader", *common, "--crop", "32x64")
    assert r.exit_code == 0 and "note:" not in r.text, r.output
