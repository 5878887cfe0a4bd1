"""The softprep CLI end to end, as a user runs it."""

import json
import os
import sys
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from softprep import manifest as manifests
from softprep.cli import MULTI_VALUE, app
from softprep.manifest import load_manifest
from softprep.terminal import expand_multi_value
from tests.conftest import needs_fork

runner = CliRunner()


def run(*args):
    """Invoke the CLI; ``.text`` is the output with rich's line wrapping undone."""
    result = runner.invoke(app, expand_multi_value([str(a) for a in args], MULTI_VALUE))
    result.text = " ".join(result.output.split())
    return result


def recorded_bar(monkeypatch) -> list:
    """The CLI's progress bars, replaced: the list of their (description, done, total)."""
    import softprep.cli

    calls = []

    @contextmanager
    def progress_bar(description):
        yield lambda done, total, what=description: calls.append((what, done, total))

    monkeypatch.setattr(softprep.cli, "progress_bar", progress_bar)
    return calls


def test_multi_value_options_expand():
    assert expand_multi_value(
        ["build", "x", "--scales", "1/8", "1/4", "--jobs", "2"], MULTI_VALUE
    ) == [
        "build",
        "x",
        "--scales",
        "1/8",
        "--scales",
        "1/4",
        "--jobs",
        "2",
    ]


def test_sample_build_info_verify_show_priors(tmp_path, monkeypatch):
    data, store = tmp_path / "cs", tmp_path / "cs.zarr"
    assert run("sample", "cityscapes", data, "--train", 3, "--val", 1).exit_code == 0
    r = run("scan", "cityscapes", "--root", data)
    assert r.exit_code == 0 and "class histogram" in r.text
    assert f"cityscapes {load_manifest('cityscapes').version} at {data}\n" in r.output  # whole
    args = ["build", "cityscapes", "--root", data, "--scales", "1/8", "1/4", "--out", store]
    r = run(*args, "--jobs", 2, "--images-per-shard", 3)
    assert r.exit_code == 0, r.output
    assert "4 built" in r.text and " img/s (" in r.text
    r = run(*args, "--images-per-shard", 3)
    assert "0 built, 4 already done, 0 skipped (" in r.text  # no rate of nothing built
    photo = next((data / "leftImg8bit/val").rglob("*.png"))
    photo.write_bytes(photo.read_bytes() + b"\0")  # the same name, another file
    r = run(*args, "--images-per-shard", 3)
    assert "note: 1 image(s) changed since they were built" in r.text, r.output
    assert (
        f"rebuilt with the images sharing their shards: val/{photo.parent.name}/{photo.name[: -len('_leftImg8bit.png')]}"
        in r.text
    )
    assert "1 built, 3 already done" in r.text
    stat = photo.stat()
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    bar = recorded_bar(monkeypatch)
    r = run(*args, "--images-per-shard", 3)
    assert "1 image(s) have files with new modification times but the same bytes" in r.text
    assert bar == [("checking changed files", 1, 1), ("building", 4, 4)]  # the bar's stages
    assert "0 built, 4 already done" in r.text
    r = run(*args)
    assert r.exit_code == 2 and "images_per_shard: 3 -> None" in r.text
    r = run("info", store)
    assert r.exit_code == 0 and "1/4" in r.text and "3 image(s) per shard" in r.text
    assert run("verify", store).exit_code == 0
    shown = tmp_path / "new" / "s.png"  # outputs' missing folders are made, as build's
    r = run("show", store, "--index", 3, "--level", "1/4", "--out", shown)
    assert r.exit_code == 0 and shown.stat().st_size > 1000
    reports = tmp_path / "reports"
    r = run("priors", "--store", store, "--compare", "nn", "nn-floor",
            "--csv", reports / "p.csv", "--plot", reports / "plots" / "p.png")  # fmt: skip
    assert r.exit_code == 0 and "nearest neighbour drops" in r.text
    assert (reports / "plots/p.png").exists() and (reports / "p.csv").exists()
    r = run("priors", "--store", store, "--plot", reports)  # a folder: refused before work
    assert r.exit_code == 2 and f"--plot {reports} is a folder" in r.text, r.output
    assert "nearest" not in r.text
    r = run("priors", "--store", store, "--csv", "s3://bucket/p.csv")  # not written locally
    assert r.exit_code == 2 and "give a local file (URLs are not written)" in r.text, r.output
    meta = (store / "zarr.json").read_bytes()  # an output inside the store it reads: refused
    for args in (["show", store, "--out"], ["priors", "--store", store, "--json"]):
        r = run(*args, store / "zarr.json")
        assert r.exit_code == 2 and f"lies inside the input {store}" in r.text, r.output
    assert (store / "zarr.json").read_bytes() == meta


@pytest.mark.parametrize(
    "args,message",
    [
        (["build", "cityscapes", "--root", "/nonexistent"], "dataset root not found"),
        (["build", "pascal", "--root", "."], "unknown dataset"),
        (["build", "cityscapes", "--root", ".", "--kernel", "lanczos"], "unknown kernel"),
        (
            ["build", "cityscapes", "--root", ".", "--scales", "1/8", "1/4", "0.125"],
            "scale 1/8 is given twice",
        ),  # fmt: skip
        (["build", "cityscapes", "--root", ".", "--scales", "1/0"], "is not a scale"),
        (
            ["build", "cityscapes", "--root", ".", "--scales", "1/8,1/4"],
            "separate values with spaces, e.g. --scales 1/8 1/4",
        ),
        (["info", "/nonexistent.zarr"], "no zarr store"),
        (["priors"], "give --store"),
    ],
)
def test_bad_input_exit_code_2_and_message(args, message):
    r = run(*args)
    assert r.exit_code == 2
    assert message in r.text


def test_scan_groups_files_with_the_same_problem(tmp_path):
    data = tmp_path / "cs"
    run("sample", "cityscapes", data, "--train", 5, "--val", 1)
    images = sorted((data / "leftImg8bit/train").rglob("*.png"))
    for image in images[:4]:  # four labels without their images: one message
        image.unlink()
    r = run("scan", "cityscapes", "--root", data)
    lines = [line for line in r.output.splitlines() if line.startswith("problem:")]
    assert r.exit_code == 1 and "4 problem(s)" in r.text, r.output
    assert len(lines) == 4 and lines[-1] == (
        "problem: ... and 1 more file(s): label without an image (--json lists them all)"
    ), lines


def test_a_file_given_as_the_store_is_refused_and_kept(samples, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("mine")
    r = run("build", "cityscapes", "--root", samples["cityscapes"], "--scales", "1/8",
            "--out", notes)  # fmt: skip
    assert r.exit_code == 2 and f"{notes} is a file, not a store (a folder)" in r.text, r.output
    assert notes.read_text() == "mine" and "resume" not in r.text  # nothing to resume
    r = run("build", "cityscapes", "--root", samples["cityscapes"], "--scales", "1/8",
            "--out", notes, "--repair")  # fmt: skip
    assert r.exit_code == 2 and "is a file, not a store" in r.text and "without" not in r.text
    for command in (["info", notes], ["verify", notes]):
        r = run(*command)
        assert r.exit_code == 2 and f"{notes} is a file, not a store" in r.text, r.output
    assert notes.read_text() == "mine"


def test_sample_writes_a_test_split_where_the_dataset_has_one(tmp_path):
    r = run("sample", "camvid", tmp_path / "cv", "--train", 1, "--val", 1, "--test", 2)
    assert r.exit_code == 0 and "wrote 4 camvid" in r.text, r.output
    assert len(list((tmp_path / "cv/testannot").glob("*.png"))) == 2
    r = run("sample", "ade20k", tmp_path / "ade", "--test", 1)
    assert r.exit_code == 2 and "--test 1: ade20k has no test split" in r.text, r.output


def test_verify_exit_code_on_damage(tmp_path):
    import zarr

    data, store = tmp_path / "cs", tmp_path / "cs.zarr"
    run("sample", "cityscapes", data, "--train", 2, "--val", 0)
    run("build", "cityscapes", "--root", data, "--scales", "1/4", "--out", store)
    zarr.open_group(str(store), mode="r+")["images/done"][0] = False
    r = run("verify", store)
    assert r.exit_code == 1 and "not built" in r.text


def test_image_only_splits_and_a_folder_of_images_are_built_void(tmp_path):
    import numpy as np
    from PIL import Image

    from softprep.manifest import VOID, load_manifest
    from softprep.sample import write_sample
    from softprep.store import SoftStore

    data, store, photos = tmp_path / "cs", tmp_path / "cs.zarr", tmp_path / "photos"
    write_sample(load_manifest("cityscapes"), data, {"train": 2, "val": 1, "train_extra": 2})
    photos.mkdir()
    Image.new("RGB", (300, 200), (10, 20, 30)).save(photos / "dashcam.jpg")
    r = run(
        "build", "cityscapes", "--root", data, "--scales", "1/8", "--out", store,
        "--split", "train", "--split", "train_extra", "--unlabeled", photos, "--jobs", 2,
    )  # fmt: skip
    assert r.exit_code == 0 and "5 built" in r.text, r.output
    s = SoftStore(str(store))
    assert s.image_only_splits == ["train_extra", "unlabeled"]
    assert list(s.names()[-1:]) == ["unlabeled/dashcam"]
    for i in np.flatnonzero(np.isin(s.split_of(), s.image_only_splits)):
        index, prob = s.read_soft(0.125, int(i))
        assert (index[0] == VOID).all() and (prob[0] == 255).all()  # all void
    assert (s.full_counts()[s.split_of() == "train"][:, :-1].sum(1) > 0).all()
    r = run("info", store)
    assert "train_extra 2 (no labels), unlabeled 1 (no labels)" in r.text
    assert run("verify", store).exit_code == 0
    r = run("priors", "--store", store, "--split", "train_extra")
    assert r.exit_code == 2 and "'train_extra' has no labels" in r.text
    r = run("build", "cityscapes", "--root", data, "--out", tmp_path / "x.zarr",
            "--unlabeled", tmp_path / "nowhere")  # fmt: skip
    assert r.exit_code == 2 and "nowhere: folder of unlabelled images not found" in r.text


@pytest.mark.slow
def test_ctrl_c_during_a_parallel_build_says_one_line_and_resumes(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it, while workers
    write shards: exit 130, one line saying how far it got and how to resume, no worker
    tracebacks or resource-tracker warnings; the resumed store equals a clean build."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from softprep.manifest import load_manifest
    from softprep.sample import write_sample
    from tests.test_build import assert_same_store

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # inherited by the builds too
        pytest.skip("SIGINT is ignored in this session (run in the background or by nohup)")
    data = tmp_path / "cs"
    write_sample(load_manifest("cityscapes"), data, {"train": 22, "val": 2}, (384, 768), seed=3)
    cmd = [sys.executable, "-m", "softprep", "build", "cityscapes", "--root", str(data),
           "--scales", "1/8", "1/2", "--images-per-shard", "1", "--jobs", "2"]  # fmt: skip
    ref, url = tmp_path / "ref.zarr", tmp_path / "cut.zarr"
    subprocess.run([*cmd, "--out", str(ref)], check=True, capture_output=True)
    shards = url / "levels" / "x0.5" / "soft"
    interrupted = 0
    for wanted in (1, 4, 10):  # shards written before Ctrl-C: early, then later
        p = subprocess.Popen([*cmd, "--out", str(url)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        # at least one shard of its own first: a signal before Python has installed its
        # handler (its first ~20 ms) kills any Python process silently
        written = len(list(shards.glob("c.*"))) if shards.is_dir() else 0
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            if shards.is_dir() and len(list(shards.glob("c.*"))) >= max(wanted, written + 1):
                break
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
        if p.returncode == 0:
            break  # it finished first: nothing left to interrupt
        interrupted += 1
        assert p.returncode == 130, err
        for junk in ("Traceback", "leaked", "TerminatedWorkerError", "Error"):
            assert junk not in err, err
        last = err.strip().splitlines()[-1]
        assert re.fullmatch(
            r"interrupted after \d+ of 24 images; run the same command again to resume", last
        ), err
    assert interrupted
    subprocess.run([*cmd, "--out", str(url)], check=True, capture_output=True)
    assert_same_store(ref, url)


def test_refusals_and_verify_give_the_command_with_the_store_s_options(tmp_path):
    """A resume that leaves options out is refused with the command that has them; verify's
    next step after damage is that command with --repair. Both run as printed."""
    import re
    import shlex

    data, url = tmp_path / "cs", tmp_path / "cs.zarr"
    run("sample", "cityscapes", data, "--train", 3, "--val", 1)
    options = ["--scales", "1/8", "1/2", "--no-antialias", "--k", 4, "--stats-for",
               "bilinear-noaa", "area", "--images-per-shard", 2, "--split", "train"]  # fmt: skip
    assert run("build", "cityscapes", "--root", data, *options, "--out", url).exit_code == 0
    r = run("build", "cityscapes", "--root", data, "--scales", "1/8", "1/2", "--out", url)
    assert r.exit_code == 2 and "built with other options" in r.text
    given = re.search(r"give its options: softprep build (.*?); to build anew", r.text).group(1)
    r = run("build", *shlex.split(given))
    assert r.exit_code == 0 and "0 built, 3 already done" in r.text, r.output
    run("sample", "camvid", tmp_path / "cv", "--train", 1)
    r = run("build", "camvid", "--root", tmp_path / "cv", "--scales", "1/8", "--out", url)
    said = " ".join(r.output.split())  # another dataset into it: not its root with cityscapes
    assert r.exit_code == 2 and "softprep build cityscapes --root ROOT " in said, said
    (url / "levels/x0.5/soft/c.1.0.0.0").unlink()  # the shard of the third image
    r = run("verify", url)
    advice = re.search(r"rebuild them: softprep build (.*?) \(ROOT: the dataset's root\)", r.text)
    assert r.exit_code == 1 and advice and advice.group(1).endswith("--repair"), r.text
    r = run("build", *shlex.split(advice.group(1).replace("ROOT", str(data))))
    assert r.exit_code == 0 and "1 damaged image(s) found, 1 built" in r.text, r.output
    assert run("verify", url).exit_code == 0


class Parsed(Exception):
    """Raised by a stand-in for the build: what the CLI parsed from a command line."""


@pytest.mark.parametrize(
    "dataset,version,variant,options,skipped",
    [
        ("mapillary", "v2.0", None, dict(
            scales=(0.125, 1.5, 0.123456789), kernel="area", colour_kernel="bilinear",
            antialias=False, k=4, short_side=512, stats_for=("area", "bicubic-noaa"),
            splits=("train",), weak="blocks:0.1", weak_seed=3, images_per_shard=2), True),
        ("cityscapes", "gtFine", "trainIds", dict(scales=(0.25,)), False),
    ],
)  # fmt: skip
def test_the_printed_build_command_parses_back_to_the_store_s_options(
    tmp_path, monkeypatch, dataset, version, variant, options, skipped
):
    """The command, run through the CLI, gives the build the store's recorded options,
    dataset, version and variant, --on-error skip where files were skipped, --repair."""
    import dataclasses
    import shlex

    import softprep.cli
    from softprep.build import BuildOptions, _config
    from softprep.options import build_command

    (tmp_path / "un labeled").mkdir()
    monkeypatch.chdir(tmp_path)  # given relative through the API (the CLI resolves it)
    options = BuildOptions(**options, unlabeled="un labeled" if skipped else None)
    manifest = load_manifest(dataset, version, variant)
    meta = {"config": _config(manifest, options), "manifest": manifest.to_json(),
            "skipped": [{"path": "x.png", "error": "bad", "index": 0}] if skipped else []}  # fmt: skip
    command = build_command(meta, "s p.zarr", tmp_path, repair=True)
    if skipped:  # the first case: every option away from its default
        assert all(getattr(options, f.name) != f.default for f in dataclasses.fields(options))

    def parsed(m, root, url, opts, **kwargs):
        raise Parsed(m, root, url, opts, kwargs)

    monkeypatch.setattr(softprep.cli, "run_build", parsed)
    words = shlex.split(command)
    assert words[:2] == ["softprep", "build"]
    r = run(*words[1:])
    assert isinstance(r.exception, Parsed), r.output
    m, root, url, opts, kwargs = r.exception.args
    assert (m.dataset, m.version, m.variant) == (dataset, version, variant)
    assert _config(m, opts) == meta["config"] and (root, url) == (tmp_path, "s p.zarr")
    assert kwargs["repair"] and kwargs["on_error"] == ("skip" if skipped else "fail")


def test_the_printed_command_names_a_manifest_that_is_not_built_in(tmp_path):
    from softprep.build import BuildOptions, _config
    from softprep.options import build_command

    manifest = load_manifest("cityscapes")
    own = manifest.to_json() | {"label_values": {"7": 1, "8": 0}}  # road and sidewalk swapped
    meta = {"config": _config(manifest, BuildOptions(scales=(0.5,))), "manifest": own}
    assert build_command(meta, "s.zarr").startswith(
        "softprep build MANIFEST.json --root ROOT --scales 1/2 --out s.zarr (ROOT: the "
        "dataset's root; MANIFEST.json: the manifest file it was built with)"
    )
    path = tmp_path / "roads.json"
    assert build_command(meta, "s.zarr", "/data", manifest=str(path)) == (
        f"softprep build {path} --root /data --scales 1/2 --out s.zarr"
    )
    meta["manifest"] = manifest.to_json()
    assert build_command(meta, "s.zarr", "/data", manifest=str(path)).startswith(
        "softprep build cityscapes --root"
    )


# the softprep CLI, saying which pool local_pool made: "pool ProcessPoolExecutor" (forked)
RECORD_POOL = """
import sys
from softprep import build, run_console
made = build.local_pool
def recorded(jobs):
    pool = made(jobs)
    print("pool", type(pool).__name__, flush=True)
    return pool
build.local_pool = recorded
sys.argv = ["softprep", *sys.argv[1:]]
run_console("softprep")
"""


@pytest.mark.slow
@needs_fork
def test_a_parallel_verify_forks_its_workers_and_ends_without_warnings(tmp_path):
    """The CLI's verify starts its workers before it opens the store, so they are forked
    (once zarr's I/O thread runs, fresh interpreters: ~0.7 s each); Blosc's lock in a loky
    worker was a named semaphore, and ending the workers left "leaked semaphore objects"."""
    import subprocess

    data, url = tmp_path / "cs", tmp_path / "cs.zarr"
    run("sample", "cityscapes", data, "--train", 6, "--val", 2)
    build = ["build", "cityscapes", "--root", data, "--scales", "1/8", "--images-per-shard", 1]
    assert run(*build, "--out", url, "--jobs", 1).exit_code == 0
    r = subprocess.run(
        [sys.executable, "-c", RECORD_POOL, "verify", str(url), "--jobs", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and "ok: 8 images" in r.stdout, r.stdout + r.stderr
    assert r.stdout.startswith("pool ProcessPoolExecutor\n"), r.stdout
    assert "leaked" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_argument_error_comes_without_a_progress_bar(tmp_path):
    """The bar appears with the first progress, so a bad argument is the only line."""
    data = tmp_path / "cs"
    run("sample", "cityscapes", data, "--train", 1, "--val", 1)
    for args, message in [
        (["build", "cityscapes", "--root", data, "--split", "nope"], "has no split"),
        (["build", "cityscapes", "--root", data, "--on-error", "x"], "use fail or skip"),
        (
            ["build", "cityscapes", "--root", data, "--jobs", 0],
            "--jobs takes a positive number or auto, not 0",
        ),
        (["scan", "cityscapes", "--root", data, "--split", "nope"], "has no split"),
        (["fidelity", "cityscapes", "--root", data, "--decode", "x"], "unknown decodes"),
    ]:
        r = run(*args)
        assert r.exit_code == 2 and message in r.text, r.output
        assert r.output.strip().startswith("error:"), r.output


def test_an_up_sampling_scale_is_said_once(tmp_path):
    data = tmp_path / "cs"
    run("sample", "cityscapes", data, "--train", 1, "--val", 0, "--size", "16x32")
    r = run(
        "build", "cityscapes", "--root", data, "--scales", "1/2", "2", "--out", tmp_path / "s.zarr"
    )
    assert r.exit_code == 0, r.output
    assert r.text.count("note: --scales 2: above 1, these levels up-sample") == 1
    r = run("build", "cityscapes", "--root", data, "--scales", "1/2", "--out", tmp_path / "t.zarr")
    assert r.exit_code == 0 and "up-sample" not in r.text


def test_sample_into_a_used_folder_writes_exactly_what_is_asked(tmp_path):
    """An earlier sample is replaced whole (the count and the files agree); files sample
    did not write are refused, never deleted."""
    data = tmp_path / "cs"
    assert run("sample", "cityscapes", data, "--train", 12, "--val", 4).exit_code == 0
    r = run("sample", "cityscapes", data, "--train", 10, "--val", 2)
    assert r.exit_code == 0 and "wrote 12 cityscapes gtFine pairs" in r.text, r.output
    assert "held an earlier sample" in r.text
    assert len(list((data / "leftImg8bit").rglob("*.png"))) == 12
    assert len(list((data / "gtFine").rglob("*_labelIds.png"))) == 12
    (data / "mine.txt").write_text("keep")
    r = run("sample", "cityscapes", data, "--train", 1, "--val", 1)
    assert r.exit_code == 2 and "did not write (e.g. mine.txt)" in r.text, r.output
    assert (data / "mine.txt").read_text() == "keep"


def test_dataset_names_ignore_case_and_a_misspelling_gets_a_suggestion(tmp_path):
    from softprep.manifest import ManifestError, load_manifest

    assert load_manifest("Cityscapes") == load_manifest("cityscapes")
    assert load_manifest("MAPILLARY", "v2.0").version == "v2.0"
    with pytest.raises(ManifestError, match="did you mean 'cityscapes'"):
        load_manifest("cityscape")
    r = run("build", "citiscapes", "--root", tmp_path)
    assert r.exit_code == 2 and "unknown dataset 'citiscapes'; did you mean 'cityscapes'?" in r.text
    r = run("build", "pascal", "--root", tmp_path)
    assert r.exit_code == 2 and "did you mean" not in r.text
    data = tmp_path / "cs"
    assert run("sample", "Cityscapes", data, "--train", 1, "--val", 0).exit_code == 0
    assert run("scan", "Cityscapes", "--root", data).exit_code == 0


@pytest.mark.slow
def test_piped_messages_and_summaries_are_whole_lines(tmp_path):
    """Not at a terminal (a pipe, a log file) nothing wraps at 80 columns."""
    import os
    import subprocess
    import sys

    data = tmp_path / "cs"
    run("sample", "cityscapes", data, "--train", 1, "--val", 0, "--size", "16x32")
    store = tmp_path / ("a-store-path-long-enough-to-pass-eighty-columns-" * 2 + ".zarr")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    cmd = [sys.executable, "-m", "softprep", "build", "cityscapes", "--root", str(data),
           "--scales", "1/2", "2", "--out", str(store)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "1 built" in r.stdout, r.stdout
    note = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and note[0].endswith("to down-sample"), r.stderr


@pytest.mark.slow
def test_an_error_is_one_line_even_where_columns_is_narrow(tmp_path):
    """A path in an error must stay whole to be copied or grepped: never wrapped by rich,
    whatever COLUMNS says (a terminal wraps it for display itself)."""
    import os
    import subprocess
    import sys

    store = tmp_path / ("a-missing-store-path-longer-than-forty-columns-" * 2 + ".zarr")
    env = os.environ | {"COLUMNS": "40"}
    cmd = [sys.executable, "-m", "softprep", "info", str(store)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
    assert r.stderr.count("\n") == 1 and str(store) in r.stderr, r.stderr


def test_help_shows_value_names_and_cuts_nothing_at_80_columns():
    """--help of every command of both CLIs at 80 columns: value names (none for flags,
    TEXT / INTEGER / FRACTION ... for lists), never Python types, no text cut off."""
    import typer

    from softtrain.cli import app as softtrain_app

    for cli in (app, softtrain_app):
        names = list(typer.main.get_command(cli).commands)
        for name in [None, *names]:
            args = [name, "--help"] if name else ["--help"]
            r = runner.invoke(cli, args, env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
            assert r.exit_code == 0, (name, r.output)
            for python_type in ("<bool>", "<str>", "<int>", "<float>", "list[", "<path>"):
                assert python_type not in r.output, (name, python_type, r.output)
            cut = [x for x in r.output.splitlines() if "…" in x]
            assert not cut, (name, cut)
            assert "'softprep'" not in r.output, name  # rich ate an extra's [brackets]
    r = runner.invoke(app, ["build", "--help"], env={"COLUMNS": "80"})
    assert "FRACTION ..." in r.output and "--json" not in r.output
    # build's options in panels, so that one long flag pair does not narrow every help text
    levels, running = r.output.index("─ Levels ─"), r.output.index("─ Store and processes ─")
    assert levels < r.output.index("--no-antialias") < running < r.output.index("--jobs")
    assert "--weak-seed" in r.output[:levels]
    for cli in (app, softtrain_app):  # a docstring's line breaks are not the terminal's
        for name, command in typer.main.get_command(cli).commands.items():
            assert all("\n" not in p for p in command.help.split("\n\n")), (name, command.help)
    fit = typer.main.get_command(softtrain_app).commands["fit"]
    assert "pass --resume or --overwrite. SIGTERM / Ctrl-C save last.pt" in fit.help
    helps = {p.opts[0]: p.help for p in fit.params}
    assert helps["--optimizer"].endswith("[default: sgd; choices: sgd, adamw]")
    assert helps["--store"].endswith("[required, unless --config or --resume gives it]")
    r = runner.invoke(app, ["info", "--help"], env={"COLUMNS": "80"})
    line = next(x for x in r.output.splitlines() if "--json" in x)
    assert "TEXT" not in line and "BOOL" not in line.upper().replace("--JSON", "")


def test_reflowed_help_keeps_what_click_hides_and_keeps_unwrapped_paragraphs():
    import typer

    from softprep.terminal import reflow_help

    demo = typer.Typer()

    @demo.command()
    def one():
        """Summary.

        \b
        kept:
        - as laid out

        A paragraph
        over two lines.
        \f
        :param x: hidden, as Click hides it.
        """

    @demo.command()
    def two():
        pass

    reflow_help(demo)
    r = runner.invoke(demo, ["one", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert r.exit_code == 0 and "A paragraph over two lines." in r.output, r.output
    assert "kept:\n" in r.output.replace(" ", "").replace("│", "") and "hidden" not in r.output
    assert runner.invoke(demo, ["two", "--help"]).exit_code == 0


@pytest.mark.slow
def test_a_ctrl_c_while_the_interpreter_exits_is_ignored():
    """After the command has ended (and said so), SIGINT is ignored: a Ctrl-C during the
    interpreter's exit (~0.2 s) used to end a finished build with -SIGINT and no message."""
    import subprocess
    import sys

    code = (
        "import atexit, signal, sys\n"
        "from softprep.cli import main\n"
        "atexit.register(lambda: print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN))\n"
        "sys.argv = ['softprep', '--version']\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split()[-1] == "True", r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("pkg", ["softprep", "softtrain"])
def test_a_ctrl_c_while_the_cli_imports_is_one_line(pkg):
    """The console scripts' entry (``pkg.__main__:main``): an interrupt while the CLI module
    is still being imported is one line and exit 130, never a traceback."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Interrupted:  # the import of the CLI module is where Ctrl-C lands\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == '{pkg}.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupted())\n"
        f"from {pkg}.__main__ import main\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stderr == "interrupted before the command started\n", r


def _fake_package(root, cli: str, before: str = "") -> None:
    """A package ``fakecli`` under ``root``: ``cli.py`` is ``cli``; ``python -m fakecli``
    runs ``before``, then ``run_console('fakecli')`` as the console scripts do."""
    (root / "fakecli").mkdir()
    (root / "fakecli" / "__init__.py").write_text("")
    (root / "fakecli" / "cli.py").write_text(cli)
    (root / "fakecli" / "__main__.py").write_text(
        before + "from softprep import run_console\nrun_console('fakecli')\n"
    )


@pytest.mark.slow
def test_an_interrupt_handled_inside_exec_code_ends_with_the_commands_exit_code(tmp_path):
    """CPython 3.11 marks a process to die by SIGINT once a KeyboardInterrupt passed through
    code run by ``exec`` of a string (dataclasses, numba do that), even if the command then
    handled it: the console entry clears that mark, so the command's own 130 stands."""
    import subprocess
    import sys

    _fake_package(
        tmp_path,
        "def main():\n"
        "    try:\n"
        "        exec('raise KeyboardInterrupt')  # a Ctrl-C landing in exec'd code\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted after 3 of 9 images', flush=True)\n"
        "        raise SystemExit(130)\n",
    )
    # ``python -m``, as the console scripts run: there CPython checks the mark after exit()
    r = subprocess.run([sys.executable, "-m", "fakecli"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 130 and r.stdout == "interrupted after 3 of 9 images\n", r


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_pauses_the_collector_and_restores_its_state(enabled):
    """Imports and the kernels' load run with the collector off; afterwards it is as before,
    also when the block raises."""
    import gc

    from softprep import gc_paused

    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.raises(RuntimeError), gc_paused():
            assert not gc.isenabled()
            raise RuntimeError
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


def _fake_cli(root, exit_code):
    """A package ``fakecli`` under ``root`` whose ``cli.main`` leaves a garbage cycle (``ref``
    points weakly to it), registers an exit handler (as multiprocessing, zarr and torch do)
    and exits with ``exit_code``. Under ``python -m fakecli`` each exit handler prints whether
    the objects are frozen: the command's runs before ``run_console``'s freeze, the one
    registered before ``run_console`` after it."""
    _fake_package(
        root,
        "import atexit, gc, weakref\n"
        "collector_during_import = gc.isenabled()\n"
        "class Node:\n"
        "    pass\n"
        "def report():\n"
        "    print('frozen', gc.get_freeze_count() > 0)\n"
        "def main():\n"
        "    global ref\n"
        "    node = Node()\n"
        "    node.self = node\n"
        "    ref = weakref.ref(node)\n"
        "    atexit.register(report)\n"
        f"    raise SystemExit({exit_code})\n",
        "import atexit, gc\natexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n",
    )


@pytest.mark.parametrize("exit_code", [0, 2])
def test_the_console_entry_spares_the_exit_a_garbage_collection(tmp_path, exit_code):
    """At the interpreter's exit, after the other exit handlers, what the command built is
    frozen (``gc.freeze``): the exit then skips walking it for cycles (0.08-0.19 s once numba
    has loaded, measured), whatever the exit code."""
    import subprocess
    import sys

    _fake_cli(tmp_path, exit_code)
    r = subprocess.run([sys.executable, "-m", "fakecli"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)  # fmt: skip
    assert r.returncode == exit_code and r.stdout == "frozen False\nfrozen True\n", r


def test_the_console_entry_called_in_process_freezes_nothing(tmp_path, monkeypatch):
    """A notebook or test that calls the entry in-process keeps a working collector: it is
    paused only while the CLI is imported, the command's garbage cycle is collected, and
    nothing is frozen until the interpreter exits."""
    import atexit
    import gc
    import sys

    from softprep import run_console

    _fake_cli(tmp_path, 0)
    monkeypatch.syspath_prepend(str(tmp_path))
    gc.collect()
    try:
        with pytest.raises(SystemExit):
            run_console("fakecli")
        assert sys.modules["fakecli.cli"].collector_during_import is False  # gc_paused
        assert gc.isenabled()
        gc.collect()
        assert gc.get_freeze_count() == 0
        assert sys.modules["fakecli.cli"].ref() is None  # the cycle main() left is freed
    finally:
        gc.unfreeze()  # had it failed so, the rest of the session's objects stay collectable
        atexit.unregister(gc.freeze)
        cli = sys.modules.pop("fakecli.cli", None)
        if cli is not None:
            atexit.unregister(cli.report)
        sys.modules.pop("fakecli", None)


def test_reports_from_a_dataset_use_the_options_a_build_would(tmp_path):
    """``priors DATASET`` without options computes the levels a default build stores, and
    its options act as build's do (compared through the store's report of the same data)."""
    data = tmp_path / "cs"
    run("sample", "cityscapes", data, "--train", 2, "--val", 0, "--size", "64x128")
    for options in ([], ["--scales", "1/4", "--no-antialias", "--kernel", "area"]):
        store = tmp_path / f"s{len(options)}.zarr"
        assert run("build", "cityscapes", "--root", data, *options, "--out", store).exit_code == 0
        reports = []
        for source in (["cityscapes", "--root", data, *options], ["--store", store]):
            r = run("priors", *source, "--json", tmp_path / "p.json")
            assert r.exit_code == 0, r.output
            reports.append(json.loads((tmp_path / "p.json").read_text())["rows"])
        assert reports[0] == reports[1] and len(reports[0]) > 0
        levels = {row["level"] for row in reports[0]}
        assert levels == ({"1/4"} if options else {"1/8", "1/4", "1/2"}), levels


def test_datasets_lists_every_manifest_readably_when_piped():
    r = run("datasets")  # CliRunner's output is not a terminal, as a pipe
    assert r.exit_code == 0
    for m in manifests.available():
        assert f"│ {m['dataset']} " in r.output and m["description"].split()[0] in r.output
    assert max(len(line) for line in r.output.splitlines()) <= 120, r.output
