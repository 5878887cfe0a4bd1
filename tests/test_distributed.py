"""torchrun + DDP on the CPU (Gloo, two processes, a tiny model): the ranks share each
epoch without overlap, training runs and the loss falls, distributed evaluation equals the
single-process one exactly, checkpoints move between DDP and single-process runs, and
too many ranks for the data are refused with a message."""

import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from softprep.build import BuildOptions, build
from softprep.manifest import load_manifest
from softtrain.checkpoint import load_checkpoint
from softtrain.config import FitConfig
from softtrain.evaluate import eval_checkpoint
from softtrain.fit import fit
from softtrain.loader import RunSampler
from softtrain.runlog import read_metrics
from tests.tinynet import TINY, child_env


@pytest.fixture(scope="module")
def store(samples, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("ddp") / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.125,)))
    return url


def first_epoch(sampler: RunSampler, steps: int, batch: int) -> list[list[int]]:
    it = iter(sampler)
    return [[next(it) for _ in range(batch)] for _ in range(steps)]


@pytest.mark.parametrize("n,batch,world", [(23, 2, 3), (8, 4, 2), (9, 1, 4)])
def test_ranks_share_each_epoch_disjointly(n, batch, world):
    single = RunSampler(n, batch * world, seed=5)
    steps = single.per_epoch
    assert steps == n // (batch * world)
    whole = first_epoch(single, steps, batch * world)
    shares = [
        first_epoch(RunSampler(n, batch, 5, rank=r, world=world), steps, batch)
        for r in range(world)
    ]
    for j in range(steps):  # step j of the run = the ranks' shares of step j, in rank order
        assert sum((shares[r][j] for r in range(world)), []) == whole[j]
    flat = [i for share in shares for step in share for i in step]
    assert len(flat) == len(set(flat))
    resumed = first_epoch(RunSampler(n, batch, 5, start=1, rank=world - 1, world=world), 1, batch)
    if steps > 1:  # a resume at step 1 starts with the rank's share of step 1
        assert resumed[0] == shares[world - 1][1]


def torchrun(*args, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "softtrain", "fit", *map(str, args)]  # fmt: skip
    env = child_env()  # the model is tests.tinynet's
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


COMMON = ["--model", TINY, "--crop", "32x64", "--levels", "1/8", "--lr", "0.05",
          "--workers", "0", "--device", "cpu", "--log-every", "1"]  # fmt: skip


@pytest.mark.slow
def test_ddp_trains_evaluates_like_one_process_and_hands_over_checkpoints(store, tmp_path):
    out = tmp_path / "run"
    r = torchrun("--store", store, "--out", out, "--batch-size", 2, "--iters", 20,
                 "--eval-every", 10, "--eval-level", "1/8", *COMMON)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    records = read_metrics(out / "metrics.jsonl")
    train = [x for x in records if x["type"] == "train"]
    assert [x["step"] for x in train] == list(range(1, 21))  # rank 0 alone writes
    losses = [x["loss"] for x in train]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 20 and len(ckpt["rng"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])  # loads without DDP
    final = [x for x in records if x["type"] == "eval"][-1]
    confusion, _ = eval_checkpoint(str(out / "last.pt"), store, "1/8", device="cpu")
    assert final["step"] == 20 and final["mIoU"] == confusion.miou()  # exactly
    assert final["aAcc"] == confusion.pixel_accuracy()
    resumed = fit(FitConfig.from_toml(out / "config.toml", iters=22), resume=True)
    assert resumed["step"] == 22  # a DDP checkpoint continues in one process
    r = torchrun("--out", out, "--resume", "--iters", 24, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr  # and back under DDP
    assert load_checkpoint(out / "last.pt")["step"] == 24


@pytest.mark.slow
def test_the_logged_loss_and_kl_are_both_means_over_ranks_and_micro_batches(store, tmp_path):
    """Hard targets: KL equals the loss on every micro-batch of every rank, so the two logged
    means agree only if both cover the same micro-batches and ranks."""
    out = tmp_path / "run"
    r = torchrun("--store", store, "--out", out, "--batch-size", 2, "--accum", 2, "--iters", 2,
                 "--loss", "ce-hard", *COMMON)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    train = [x for x in read_metrics(out / "metrics.jsonl") if x["type"] == "train"]
    assert len(train) == 2
    for x in train:
        assert x["kl"] == pytest.approx(x["loss"], rel=1e-5), x


@pytest.mark.slow
def test_teacher_student_under_ddp_resumes_exactly(store, tmp_path):
    """Two forwards per micro-batch (teacher, student), gradients synchronised on the last of
    two micro-batches, crops larger than the images (32x64 at 1/8), ESL and IPixMatch (which
    use the teacher's probabilities): a run resumed under torchrun from its step-2 checkpoint
    ends as the uninterrupted one. Each rank's teacher must hold the BatchNorm statistics rank 0
    saves, or the resumed ranks' teachers differ from the ones they had."""
    semi = ["--batch-size", 1, "--accum", 2, "--labeled", "1/2", "--unlabeled-batch", 1,
            "--semi-esl", "--semi-ipix", "kl", "--save-every", 2,
            *[a if a != "32x64" else "48x96" for a in COMMON]]  # fmt: skip
    straight, split = tmp_path / "a", tmp_path / "b"
    r = torchrun("--store", store, "--out", straight, "--iters", 4, "--keep-checkpoints", 2, *semi)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "of each crop is void padding" in r.stdout + r.stderr  # the banner's note
    train = [x for x in read_metrics(straight / "metrics.jsonl") if x["type"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3, 4] and all(np.isfinite(x["loss"]) for x in train)
    shutil.copytree(straight, split)  # as if stopped after step 2's save
    shutil.copy(split / "iter_2.pt", split / "last.pt")
    r = torchrun("--out", split, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["world_size"] == b["world_size"] == 2 and a["step"] == b["step"] == 4
    for part in ("model", "teacher"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part} {k}")
    assert any(not torch.equal(a["model"][k], a["teacher"][k]) for k in a["model"])


@pytest.mark.slow
def test_more_ranks_than_a_batch_of_images_is_refused(store, tmp_path):
    r = torchrun("--store", store, "--out", tmp_path / "run", "--batch-size", 4, "--iters", 2,
                 *COMMON)  # fmt: skip
    assert r.returncode != 0
    text = " ".join((r.stdout + r.stderr).split())
    assert "fewer than one step's batch of 4 per process x 2 process(es)" in text
    assert not (tmp_path / "run").exists()


PROBE = """import atexit, sys, torch
atexit.register(lambda: print("exit handlers ran"))
import softtrain.cli as cli
from softtrain import distributed


@cli.app.command("boom")
def boom():
    raise RuntimeError("boom")


if sys.argv[1] == "joined":
    distributed.teardown(distributed.setup(torch.device("cpu")))
sys.argv = ["softtrain", *sys.argv[2:]]
cli.main()"""


def ranks_running(how: str, *args) -> list[subprocess.CompletedProcess]:
    """``softtrain ARGS`` (``PROBE``) in two processes that have joined one Gloo group and
    left it (``how`` = "joined"), as torchrun's ranks do, or that have not ("alone")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env() | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, "-c", PROBE, how, *args], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env | {"RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]  # fmt: skip
    done = []
    try:
        for p in ranks:  # communicate, not wait: a rank's full pipe cannot stall it
            out, err = p.communicate(timeout=120)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in ranks:  # a rank that hung is not left behind
            p.kill()
            p.wait()
    return done


@pytest.mark.slow
def test_a_rank_ends_with_its_exit_code_and_output_but_not_the_interpreters_finalisation():
    """Once a process has joined a group, whatever ends its command ends it at once
    (``distributed.exit_rank``): Gloo's threads, kept alive by DDP, aborted finished runs
    now and then during the interpreter's finalisation. A process that has not joined one
    ends as usual, whatever WORLD_SIZE says."""
    for args, code, said in [
        (["--version"], 0, "softtrain "),
        (["fit", "--bogus"], 2, "--bogus"),
        (["boom"], 1, "RuntimeError: boom"),
    ]:
        for how in ("joined", "alone"):
            for r in ranks_running(how, *args):
                assert r.returncode == code and said in r.stdout + r.stderr, r.stdout + r.stderr
                assert ("exit handlers ran" in r.stdout) == (how == "alone"), r.stdout
