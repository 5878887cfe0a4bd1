"""Long-run safety of softtrain fit: killed and resumed runs equal uninterrupted ones, run
folders are never overwritten by accident, resumes are refused or applied (never ignored),
damaged checkpoints are named, logs and TensorBoard events are written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from softprep.build import BuildOptions, build
from softprep.manifest import load_manifest
from softtrain.checkpoint import CheckpointError, load_checkpoint
from softtrain.config import FitConfig
from softtrain.fit import TrainingError, fit
from softtrain.runlog import curves_figure, read_metrics
from tests.tinynet import TINY, child_env

runner = CliRunner()


@pytest.fixture(scope="module")
def store(samples, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("runs") / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.125,)))
    return url


def tiny(store, out, **kw):
    options = dict(
        store=store,
        out=str(out),
        model=TINY,
        crop="32x64",
        batch_size=2,
        iters=6,
        lr=0.02,
        workers=0,
        device="cpu",
        log_every=1,
    )
    return FitConfig.of(**(options | kw))


def assert_same_weights(a, b):
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def cli_args(cfg: FitConfig) -> list[str]:
    return [
        "--store", cfg.data.store, "--out", cfg.run.out, "--model", cfg.optim.model,
        "--crop", cfg.data.crop, "--batch-size", str(cfg.optim.batch_size),
        "--iters", str(cfg.optim.iters), "--lr", str(cfg.optim.lr),
        "--device", "cpu", "--log-every", "1", "--save-every",
        str(cfg.run.save_every), "--eval-every", str(cfg.run.eval_every),
    ]  # fmt: skip


def start_fit(cfg: FitConfig, log_path, workers: int = 0):
    """``softtrain fit`` in a child process of its own process group, stderr to a file (as
    under nohup / SLURM)."""
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "softtrain", "fit", *cli_args(cfg), "--workers", str(workers)]
    env = child_env()  # the model is tests.tinynet's
    return subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, env=env), log


def wait_for_steps(out, n: int, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
        if len(steps) >= n:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise TimeoutError


# steps of the runs that are killed after step 2: a step of tests.tinynet takes ~30 ms, so
# a run of 6 could end before the signal lands; 24 leave ~0.6 s for it under two pytest workers
KILL_ITERS = 24


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """An uninterrupted run: the weights every interrupted + resumed run must end with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    fit(tiny(store, out, iters=KILL_ITERS, eval_every=5))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGTERM to the group, 2 workers"])
def test_killed_run_resumes_to_the_uninterrupted_weights(store, reference, tmp_path, how):
    out = tmp_path / "run"
    cfg = tiny(store, out, iters=KILL_ITERS, eval_every=5, save_every=0 if "TERM" in how else 1)
    proc, log = start_fit(cfg, tmp_path / "log.txt", workers=2 if "workers" in how else 0)
    wait_for_steps(out, 2, proc)
    if "group" in how:  # what SLURM does: every process of the job, loader workers too
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(getattr(signal, how))
    rc = proc.wait(60)
    log.close()
    text = (tmp_path / "log.txt").read_text()
    if how.startswith("SIGTERM"):  # saved before exiting, said so, exit code 128 + 15
        assert rc == 143, text
        assert "SIGTERM: stopped at step" in text
        assert load_checkpoint(out / "last.pt")["step"] >= 2
    else:
        assert rc == -9
    assert f"step 1/{KILL_ITERS} loss" in text  # plain lines reach a log file
    assert f"training of {TINY} (5.8 k parameters)" in text  # not "0.0 M"
    saved = load_checkpoint(out / "last.pt")["step"]
    assert saved < KILL_ITERS
    resumed = fit(FitConfig.from_toml(out / "config.toml"), resume=True)
    assert resumed["step"] == KILL_ITERS
    assert_same_weights(reference / "last.pt", out / "last.pt")
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert steps == list(range(1, KILL_ITERS + 1))  # records past the checkpoint: once


@pytest.mark.slow
def test_a_folder_holding_a_run_is_refused_and_left_untouched(store, tmp_path):
    out = tmp_path / "run"
    fit(tiny(store, out, iters=2))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="already holds a run saved at step 2.*--resume"):
        fit(tiny(store, out, iters=1))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    fit(tiny(store, out, iters=1), overwrite=True)
    assert load_checkpoint(out / "last.pt")["step"] == 1
    assert [(r["type"], r["step"]) for r in read_metrics(out / "metrics.jsonl")] == [
        ("train", 1),
        ("eval", 1),
    ]


def test_resume_without_checkpoint_says_so(store, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume, no last.pt"):
        fit(tiny(store, tmp_path / "run"), resume=True)


@pytest.mark.slow  # trains for seconds: keeps the fast tier under a minute
def test_resume_refuses_changed_model_without_writing(store, tmp_path):
    out = tmp_path / "run"
    fit(tiny(store, out, iters=2))
    config = (out / "config.toml").read_text()
    with pytest.raises(TrainingError, match="cannot change model"):
        fit(tiny(store, out, iters=4, model="deeplabv3plus_r50"), resume=True)
    assert (out / "config.toml").read_text() == config
    assert load_checkpoint(out / "last.pt")["step"] == 2


@pytest.mark.slow
def test_resume_applies_new_lr_and_iters(store, tmp_path):
    out = tmp_path / "run"
    fit(tiny(store, out, iters=2))
    fit(tiny(store, out, iters=4, lr=0.5), resume=True)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 4 and ckpt["config"]["lr"] == 0.5
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == 0.5
    assert ckpt["scheduler"]["base_lrs"] == [0.5]


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a checkpoint", "another file"])
def test_damaged_checkpoint_is_named(store, tmp_path, damage):
    out = tmp_path / "run"
    fit(tiny(store, out, iters=1))
    path = out / "last.pt"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "another file":  # a PNG given where a checkpoint goes
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + data[8:])
    else:
        torch.save({"weights": 1}, path)
    expected = {
        "not a checkpoint": "not a softtrain checkpoint",
        "another file": r"not a checkpoint \(torch.save did not write this file\)",
    }.get(damage, "damaged")
    with pytest.raises(CheckpointError, match=f"last.pt: {expected}"):
        fit(tiny(store, out, iters=2), resume=True)


def test_non_finite_loss_without_checkpoint_claims_none(store, tmp_path, monkeypatch):
    import softtrain.weak_losses as weak_module

    real = weak_module.soft_label_loss

    def exploding(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(weak_module, "soft_label_loss", exploding)  # what fit calls
    with pytest.raises(TrainingError, match="No checkpoint was saved yet"):
        fit(tiny(store, tmp_path / "run"))


@pytest.mark.slow
def test_keep_checkpoints_and_tensorboard_events(store, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    fit(tiny(store, out, save_every=2, keep_checkpoints=2, eval_every=3, tensorboard=True))
    assert sorted(p.name for p in out.glob("iter_*.pt")) == ["iter_4.pt", "iter_6.pt"]
    assert load_checkpoint(out / "iter_4.pt")["step"] == 4
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/kl", "train/lr", "val/mIoU", "val_iou/road"} <= set(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    records = read_metrics(out / "metrics.jsonl")
    miou = [r["mIoU"] for r in records if r["type"] == "eval"]
    assert [e.value for e in events.Scalars("val/mIoU")] == pytest.approx(miou)
    assert all({"type", "time", "step"} <= set(r) for r in records)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    shown = curves_figure(records).axes[2]  # in percent, as every figure the tools print
    assert list(shown.lines[0].get_ydata()) == pytest.approx([100 * m for m in miou])
    assert shown.get_title() == "validation mIoU (%)" and shown.get_ylim() == (0, 100)
    assert {"val/image0", "val/image1"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("val/image0")] == [3, 6]
    assert events.Tags()["tensors"]  # the options: hyperparameters and text


class Recorder:
    """A user's tracker (``--tracker tests.test_runs:Recorder``)."""

    seen: list = []

    def __init__(self, out):
        self.out = out

    def start(self, options, resume_step):
        Recorder.seen.append(("start", options["lr"], resume_step))

    def scalars(self, step, values):
        Recorder.seen.append(("scalars", step, sorted(values)))

    def images(self, step, name, image):
        Recorder.seen.append(("image", step, name, image.shape))

    def close(self):
        Recorder.seen.append(("close",))


@pytest.mark.slow
def test_mlflow_file_store_and_a_users_tracker_get_params_metrics_and_images(
    store, tmp_path, monkeypatch
):
    mlflow = pytest.importorskip("mlflow")
    # MLflow 3 refuses a file store unless this is set: the tracker sets it (--help offers
    # file:./mlruns, which failed with a traceback)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded: undone after the test
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    with pytest.raises(TrainingError, match="--mlflow nosuch://x: MLflow cannot use it"):
        fit(tiny(store, tmp_path / "bad", iters=1, mlflow="nosuch://x"))  # one line, exit 2
    out, uri = tmp_path / "run", (tmp_path / "mlruns").as_uri()
    Recorder.seen = []
    fit(tiny(store, out, iters=2, eval_every=2, mlflow=uri, tracker=f"{__name__}:Recorder"))
    mlflow.set_tracking_uri(uri)
    run = mlflow.get_run((out / "mlflow_run_id").read_text())
    assert run.info.run_name == "run" and run.data.params["model"] == TINY
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2] and "val_mIoU" in run.data.metrics
    artifacts = [a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)]
    assert any(a.startswith("val_image0") for a in artifacts)
    kinds = [e[0] for e in Recorder.seen]
    assert kinds[0] == "start" and kinds[-1] == "close" and "image" in kinds
    train_keys = [
        "train/crops_per_s",
        "train/data_wait_share",
        "train/kl",
        "train/loss",
        "train/lr",
    ]
    assert ("scalars", 1, train_keys) in Recorder.seen
    from softtrain.tracking import MLflowTracker

    (out / "mlflow_run_id").write_text("0" * 32)  # a resume whose MLflow run is gone
    with pytest.raises(TrainingError, match="cannot be continued .*delete .*mlflow_run_id"):
        MLflowTracker(out, uri).start({}, resume_step=2)
    with pytest.raises(ValueError, match="--tracker nowhere:Thing: cannot import it"):
        fit(tiny(store, tmp_path / "other", tracker="nowhere:Thing"))
    assert not (tmp_path / "other").exists()


def test_store_without_validation_split_trains_unevaluated(samples, tmp_path):
    url = str(tmp_path / "train-only.zarr")
    build(
        load_manifest("cityscapes"),
        samples["cityscapes"],
        url,
        BuildOptions(scales=(0.125,), splits=("train",)),
    )
    result = fit(tiny(url, tmp_path / "run", iters=2, eval_every=1))
    assert result == {"best_miou": None, "last_miou": None, "step": 2, "rank": 0}
    assert not (tmp_path / "run/best.pt").exists() and (tmp_path / "run/last.pt").exists()


def test_config_store_is_absolute_and_every_option_is_a_flag(tmp_path, monkeypatch):
    from softtrain.cli import app
    from softtrain.config import declared

    monkeypatch.chdir(tmp_path)
    assert FitConfig.of(store="rel/cs.zarr").data.store == str(tmp_path / "rel/cs.zarr")
    text = runner.invoke(app, ["fit", "--help"], terminal_width=200).output
    missing = [d.flag for d in declared().values() if d.flag not in text]
    assert not missing and len(declared()) > 50


@pytest.mark.slow
def test_softtrain_help_imports_no_torch():
    code = "import sys, softtrain.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize(
    "option", ["--crop bad", "--crop 0x8", "--loss dice", "--lr 0", "--model resnet50"]
)
def test_fit_argument_errors_answer_before_torch_loads(option, tmp_path):
    """fit's argument errors: exit 2 with one line, torch never imported (~0.2 s)."""
    code = (
        "import sys, softtrain.cli\n"
        "try:\n    softtrain.cli.main()\n"
        "except SystemExit as e:\n    sys.exit(e.code + 10 * ('torch' in sys.modules))"
    )
    args = ["softtrain", "fit", "--store", str(tmp_path), *option.split()]
    r = subprocess.run([sys.executable, "-c", code, *args[1:]], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, (r.returncode, r.stderr)


def test_metrics_records_are_valid_json_without_nan(store, tmp_path):
    out = tmp_path / "run"
    fit(tiny(store, out, iters=1))
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert os.path.getsize(out / "config.toml") > 0


def test_missing_tensorboard_is_refused_before_anything_is_written(store, tmp_path, monkeypatch):
    import softtrain.config as config_module

    monkeypatch.setattr(config_module, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs the tensorboard package"):
        tiny(store, tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run").exists()


def damaged_copy(store: str, where) -> str:
    """A copy of ``store`` whose 1/8 soft-label shards fail their checksums."""
    import shutil
    from pathlib import Path

    url = str(where / "damaged.zarr")
    shutil.copytree(store, url)
    for shard in Path(url, "levels/x0.125/soft").glob("c.*"):
        data = bytearray(shard.read_bytes())
        for k in range(100, len(data) - 100, 50):
            data[k] ^= 0x10
        shard.write_bytes(bytes(data))
    return url


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_data_ends_the_run_and_its_workers_with_one_sentence(store, tmp_path, workers):
    url = damaged_copy(store, tmp_path)
    cfg = tiny(url, tmp_path / "run", iters=50)
    for _attempt in range(2):  # the retry is not refused: the failed run saved nothing
        t0 = time.time()
        proc, log = start_fit(cfg, tmp_path / "log.txt", workers=workers)
        rc = proc.wait(60)  # before the fix: forever, with 2 workers
        log.close()
        text = (tmp_path / "log.txt").read_text()
        assert rc == 2 and time.time() - t0 < 60, text
        assert "Traceback" not in text and "DataLoader worker" not in text, text
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and text.strip().endswith(errors[0]), text  # after the banner
        assert "softprep verify" in errors[0] and "--repair" in errors[0], text
        assert not list((tmp_path / "run").glob("*.pt"))
        assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout == b""


@pytest.mark.slow
def test_one_writer_per_run_folder(store, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(store, out, iters=400, save_every=1)
    proc, log = start_fit(cfg, tmp_path / "log.txt")
    try:
        wait_for_steps(out, 2, proc)
        for second in (dict(resume=True), dict(overwrite=True)):
            with pytest.raises(
                CheckpointError, match=f"another softtrain fit \\(pid {proc.pid}\\)"
            ):
                fit(tiny(store, out, iters=500), **second)
        assert proc.poll() is None  # the first run goes on, its files untouched
    finally:
        proc.kill()  # kill -9: the OS releases the lock, the folder is not left stuck
        proc.wait()
        log.close()
    assert fit(tiny(store, out, iters=load_checkpoint(out / "last.pt")["step"] + 1), resume=True)


@pytest.mark.slow
def test_a_full_disk_while_saving_is_a_sentence_and_last_pt_stays(store, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "run"
    fit(tiny(store, out, iters=2))
    real, calls = torch.save, []

    def full(obj, f, *a, **kw):
        calls.append(1)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        CheckpointError,
        match="last.pt: cannot save the checkpoint \\(No space "
        "left on device\\); the previous last.pt is intact.*--resume",
    ):
        fit(tiny(store, out, iters=4, save_every=1), resume=True)
    monkeypatch.setattr(torch, "save", real)
    assert calls and load_checkpoint(out / "last.pt")["step"] == 2
    assert not list(out.glob("*.tmp"))
    r = runner.invoke(
        __import__("softtrain.cli", fromlist=["app"]).app,
        [
            "fit",
            "--out",
            str(out),
            "--resume",
            "--iters",
            "3",
            "--config",
            str(out / "config.toml"),
        ],
    )
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_out_that_cannot_be_a_folder_is_refused_first(store, tmp_path, where):
    blocker = tmp_path / "file.txt"
    blocker.write_text("mine")
    out = blocker if where == "a file" else blocker / "run"
    with pytest.raises(CheckpointError, match="file.txt is a file, not a folder"):
        fit(tiny(store, out))
    assert blocker.read_text() == "mine" and sorted(tmp_path.iterdir()) == [blocker]


@pytest.mark.slow
def test_resume_with_a_damaged_last_pt_continues_from_the_newest_intact_save(
    store, tmp_path, caplog
):
    out = tmp_path / "run"
    fit(tiny(store, out, iters=4, save_every=1, keep_checkpoints=2))
    (out / "last.pt").write_bytes(b"torn")
    (out / "iter_4.pt").write_bytes((out / "iter_4.pt").read_bytes()[:100])
    with caplog.at_level("WARNING", logger="softtrain"):
        assert fit(tiny(store, out, iters=5, keep_checkpoints=2), resume=True)["step"] == 5
    assert "resuming from iter_3.pt (step 3) instead" in caplog.text
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.slow  # 2-6 s: keeps the fast tier under a minute
def test_a_stop_during_evaluation_saves_and_the_resume_redoes_it(store, tmp_path, monkeypatch):
    import softtrain.fit as fit_module

    real, calls = fit_module.evaluate, []

    def signalled(*args, **kwargs):  # SIGTERM arrives as the evaluation starts
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "evaluate", signalled)
    out = tmp_path / "run"
    with pytest.raises(fit_module.Interrupted, match="SIGTERM: stopped at step 2"):
        fit(tiny(store, out, iters=4, eval_every=2))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 2 and ckpt["pending_eval"]
    assert not [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "eval"]
    fit(tiny(store, out, iters=4, eval_every=2), resume=True)
    evals = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "eval"]
    assert evals == [2, 4] and not load_checkpoint(out / "last.pt")["pending_eval"]


def test_a_tracker_that_fails_to_start_ends_those_started_before_it(tmp_path):
    """Nothing else would end their runs: in a torchrun rank no exit handler runs."""
    from softtrain.runlog import RunLog
    from softtrain.tracking import Tracker

    events = []

    class Recording(Tracker):
        def start(self, options, resume_step):
            events.append("start")

        def close(self):
            events.append("close")

    class Failing(Tracker):
        def start(self, options, resume_step):
            raise ConnectionError("tracking server unreachable")

    with pytest.raises(ConnectionError):
        RunLog(tmp_path, [Recording(), Failing(), Recording()])
    assert events == ["start", "close"]
