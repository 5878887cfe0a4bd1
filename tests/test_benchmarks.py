"""The benchmarks run at tiny sizes (the real-data ones on generated CamVid), each part that
takes a size: CI times no benchmark, and a change to fit's options once broke one without a
test noticing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from softprep.build import usable_cores
from softprep.manifest import load_manifest
from softprep.sample import write_sample
from tests.tinynet import TINY, child_env

BENCHMARKS = Path(__file__).parent / "benchmarks"


@pytest.mark.slow  # trains four tiny runs: ~20 s
def test_bench_camvid_trains_and_scores_both_arms_on_generated_camvid(tmp_path):
    root, out = tmp_path / "CamVid", tmp_path / "out"
    write_sample(load_manifest("camvid"), root, {"train": 8, "val": 2, "test": 2}, size=(72, 96))
    command = [sys.executable, str(BENCHMARKS / "bench_camvid.py"), "--root", str(root),
               "--out", str(out), "--what", "train", "--levels", "1/8", "--seeds", "0",
               "--iters", "1/8=2", "--scales", "1/8", "--batch", "4"]  # fmt: skip
    r = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "camvid_train.json").read_text())
    runs = {(run["arm"], run["seed"]) for run in result["runs"]}
    assert runs == {("soft", 0), ("nearest", 0)}, runs
    for run in result["runs"]:  # every decode scored on test, the final weights
        assert set(run["scores"]) == {"argmax", "prior", "bias"}
        assert all(0 <= s["mIoU"] <= 1 for s in run["scores"].values())
    assert not list(out.rglob("best.pt"))  # trained unevaluated (--eval-split none)


# (script and tiny arguments, a line its report prints last): ~95 s together on 2 cores; the
# training benchmarks train tests.tinynet (their own default is deeplabv3plus_r18).
# bench_build's marginal, scaling, parent and memory parts have fixed sizes: not run here
SMOKE = [
    ("bench_loader.py --images 2 --batches 2 --batch 2 --workers 1", "crops/s per worker"),
    (
        f"bench_semi.py --images 16 --labeled 1/4 --steps 1 --device cpu --model {TINY}",
        "1.00x baseline",
    ),
    (
        f"bench_weak.py --images 4 --steps 1 --solver-steps 1 --device cpu --model {TINY}",
        "1.00x baseline",
    ),
    ("bench_build.py --images 2 --what throughput jobs size", "vs source PNGs"),
    (  # jobs16 at 2 jobs (--many 2)
        "bench_realdata.py --rounds 1 --images 24 --what jobs per-mp costs verify jobs16 "
        "--many 2 --city 2",
        "jobs2, cityscapes-size generated (2 images)",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("command,said", SMOKE, ids=[c.split()[0] for c, _ in SMOKE])
def test_each_benchmark_runs_at_a_tiny_size(tmp_path, command, said):
    if "--many 2" in command and usable_cores() < 2:
        pytest.skip("bench_realdata's jobs16 part at 2 jobs needs 2 usable cores")
    script, *args = command.split()
    r = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=tmp_path,
                       env=child_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0 and said in r.stdout, r.stdout + r.stderr
