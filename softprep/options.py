"""What a store is built with, and the small rules everything reading a store shares:
``BuildOptions``, the label-statistics strategies (``strategy_kernel``, ``strategy_masses``),
level sizes (``level_size``) and the number of images per shard. Reports (priors,
fidelity) and prediction import these, not the build orchestrator.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path

import numpy as np

from softprep.datasets import with_void_last
from softprep.resample import KERNELS, Resampler, output_size
from softprep.weak_labels import WeakProtocol

BASE_STRATEGIES = ("soft", "nn", "nn-floor")
# Images per shard: about one 2048x1024 image's pixels per shard, at most 16 images. A
# file costs ~0.1-0.7 ms to create on ext4 (measured on the 2-core machine), 6 per shard
# at 3 levels: a few percent of a 683x512 image's ~15 ms when each has its own.
SHARD_PIXELS = 2048 * 1024
MAX_IMAGES_PER_SHARD = 16


@dataclass(frozen=True)
class BuildOptions:
    """What a store is built with; stored in its metadata and checked on resume.

    ``scales``: fractions of each image's size, or of the size at which its short side is
    ``short_side`` px. ``stats_for``: extra strategies whose class priors are recorded
    (``area``, ``bilinear``, ``bicubic``; ``-noaa`` suffix for no antialias).
    """

    scales: tuple[float, ...]
    kernel: str = "bilinear"
    antialias: bool = True
    # the colour image's kernel when it is not ``kernel``: mmsegmentation's pipeline is
    # kernel "nearest" for labels and colour_kernel "bilinear" (unpaired, the usual baseline)
    colour_kernel: str | None = None
    k: int = 6
    short_side: int | None = None
    stats_for: tuple[str, ...] = ()
    splits: tuple[str, ...] | None = None
    weak: str | None = (
        None  # a softprep.weak_labels protocol for training splits, e.g. "blocks:0.1"
    )
    weak_seed: int = 0
    unlabeled: str | None = None  # a folder of images without labels: split "unlabeled"
    images_per_shard: int | None = None  # None: from the image size (``choose_images_per_shard``)

    def __post_init__(self):
        if self.unlabeled is not None:  # recorded as the absolute folder, as the CLI gives
            # it: a relative one read differently from another directory (and a printed
            # build command, resolved by the CLI, was refused as another option)
            folder = str(Path(self.unlabeled).resolve()) if self.unlabeled else None
            object.__setattr__(self, "unlabeled", folder)
        if not self.scales:
            raise ValueError("give at least one scale")
        if self.weak is not None:
            WeakProtocol.parse(self.weak)
        for kernel in (self.kernel, self.colour_kernel or self.kernel):
            if kernel not in KERNELS:
                raise ValueError(f"unknown kernel '{kernel}'; choose from {', '.join(KERNELS)}")
        if not 1 <= self.k <= 16:
            raise ValueError(f"k must be in 1..16, got {self.k}")
        if self.images_per_shard is not None and not 1 <= self.images_per_shard <= 256:
            raise ValueError(f"images per shard must be in 1..256, got {self.images_per_shard}")
        for s in self.stats_for:
            strategy_kernel(s, self)

    @property
    def strategies(self) -> list[str]:
        return list(BASE_STRATEGIES) + [s for s in self.stats_for if s not in BASE_STRATEGIES]


def build_command(
    meta: dict,
    url: str,
    root: str | Path | None = None,
    *,
    repair: bool = False,
    manifest: str | None = None,
) -> str:
    """The ``softprep build`` command that resumes (``repair``: repairs) the store at ``url``
    whose metadata is ``meta``: its dataset, scales, every option not at its default, and
    ``--on-error skip`` where it skipped files. What a store does not record reads as a
    placeholder explained after the command: the dataset ``root`` (``ROOT``) and, where the
    store's manifest is not the built-in one of its name, the manifest file (``manifest``
    where the caller knows it, else ``MANIFEST.json``)."""
    from softprep.manifest import ManifestError, available, load_manifest, same_labels

    config, stored = meta["config"], meta.get("manifest")
    try:
        builtin = load_manifest(config["dataset"], config.get("version"), config.get("variant"))
    except ManifestError:
        builtin = None
    own = builtin is not None and (stored is None or same_labels(builtin.to_json(), stored))
    placeholders = [] if root else ["ROOT: the dataset's root"]
    if not (own or manifest):
        placeholders.append("MANIFEST.json: the manifest file it was built with")
    dataset = config["dataset"] if own else manifest or "MANIFEST.json"
    words = [dataset, "--root", str(root or "ROOT"), "--scales"]
    words += [
        str(f) if float(f) == s else repr(s)  # as recorded: a resume compares the floats
        for s, f in ((s, Fraction(s).limit_denominator(1 << 16)) for s in config["scales"])
    ]
    for f in fields(BuildOptions):
        value = config.get(f.name, f.default)
        if f.name == "scales" or value == f.default or value in ([], ()):
            continue
        flag = "--split" if f.name == "splits" else "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            words += [flag, *map(str, value if isinstance(value, list | tuple) else [value])]
    if own and sum(m["dataset"] == config["dataset"] for m in available()) > 1:
        words += ["--version", config["version"]]  # else detected from the root
    if config.get("variant"):
        words += ["--labels", config["variant"]]
    if meta.get("skipped"):
        words += ["--on-error", "skip"]  # else the files it skipped stop it
    words += ["--out", url, *(["--repair"] if repair else [])]
    command = " ".join(["softprep build", *map(shlex.quote, words)])
    return f"{command} ({'; '.join(placeholders)})" if placeholders else command


def strategy_kernel(name: str, options: BuildOptions) -> tuple[str, bool]:
    """A statistics strategy -> (kernel, antialias). ``soft`` is the store's own kernel."""
    if name == "soft":
        return options.kernel, options.antialias
    if name == "nn":
        return "nearest", True
    if name == "nn-floor":
        return "nearest-floor", True
    kernel, _, suffix = name.partition("-")
    if kernel not in ("area", "bilinear", "bicubic") or suffix not in ("", "noaa"):
        raise ValueError(
            f"unknown strategy '{name}'; use nn, nn-floor, area, bilinear, bicubic "
            "(add -noaa for no antialias, e.g. bilinear-noaa)"
        )
    return kernel, suffix != "noaa"


def choose_images_per_shard(sizes: np.ndarray, options: BuildOptions) -> int:
    """``options.images_per_shard``, or from (N, 2) full-resolution sizes: ``SHARD_PIXELS``
    over the median image's pixels, 1 to ``MAX_IMAGES_PER_SHARD``."""
    if options.images_per_shard:
        return options.images_per_shard
    median = float(np.median(sizes[:, 0].astype(np.float64) * sizes[:, 1]))
    return int(np.clip(SHARD_PIXELS // max(median, 1.0), 1, MAX_IMAGES_PER_SHARD))


def level_size(hw: tuple[int, int], scale: float, short_side: int | None) -> tuple[int, int]:
    """Output (h, w) of an (H, W) image at ``scale`` (relative to ``short_side`` if given)."""
    f = scale * (short_side / min(hw) if short_side else 1.0)
    return output_size(hw[0], f), output_size(hw[1], f)


def strategy_masses(
    label, counts, out_hw, options, strategies, num_classes, made=None, soft_mass=None
) -> dict:
    """{strategy: (C+1,) class mass (void last)} of an (H, W) label at one output size.
    ``counts``: its (256,) histogram; ``made``: a Resampler already built for this size;
    ``soft_mass``: the (256,) mass of its stored planes, if made (``soft_planes``).
    ``soft`` is the mass of the stored soft labels, the others are the strategies' exact
    linear mass (nearest: counts of the sampled pixels)."""
    masses = {}
    for s in strategies:
        kernel, aa = strategy_kernel(s, options)
        same = made is not None and (kernel, aa) == (made.kernel, made.antialias)
        r = made if same else Resampler.make(label.shape, out_hw, kernel, aa)
        if s == "soft":
            if soft_mass is None:
                soft_mass = r.soft_planes(label, options.k)[1]
            masses[s] = with_void_last(soft_mass, num_classes)
        else:
            masses[s] = with_void_last(r.class_mass(label, counts), num_classes)
    return masses
