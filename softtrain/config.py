"""``FitConfig``: every option of a training run, declared once, written to
``<out>/config.toml``.

Each option is a field of one section (data, optimisation, run, speed, weak, semi) declared
with ``option``: default, help, and the command-line flag it keeps (``--batch-size``,
``--weak-lambda``, ``--semi-threshold``). ``softtrain fit`` and ``compare`` generate their
flags from these declarations; ``FitConfig.of(batch_size=2, weak_lambda=1)`` builds a config
from the same flat keys; ``config.toml`` holds one table per section (a flat file of earlier
versions still loads); checkpoints record the flat keys.

Light on purpose (no torch import), so ``softtrain --help`` answers at once.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from importlib.util import find_spec
from pathlib import Path
from typing import Any, get_type_hints

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

LOSSES = ("soft", "ce-hard")
MC_MODES = ("include", "exclude")
WEAK_LOSSES = ("none", "potts", "self-label")  # softtrain.weak_losses
POTTS = (
    "bilinear",
    "quadratic",
    "normalised-quadratic",
    "collision-ce",
    "collision-divergence",
    "log-quadratic",
)
XENT = ("standard", "reverse", "collision")
IPIX = ("none", "kl", "corr")
NO_EVAL = "none"  # --eval-split none: no evaluation during or after training
# Model names fit accepts (softtrain.models builds them): name -> (head class, timm trunk);
# an entry added here (``softtrain.MODELS``) is a model like the others.
MODELS = {
    "hrnetv2_w18": ("HRNetV2", "hrnet_w18"),
    "hrnetv2_w32": ("HRNetV2", "hrnet_w32"),
    "hrnetv2_w48": ("HRNetV2", "hrnet_w48"),
    "deeplabv3plus_r18": ("DeepLabV3Plus", "resnet18"),
    "deeplabv3plus_r50": ("DeepLabV3Plus", "resnet50"),
    "deeplabv3plus_r101": ("DeepLabV3Plus", "resnet101"),
}
# Training methods behind the one loop (softtrain.regime): name -> "module:class".
REGIMES = {
    "supervised": "softtrain.supervised:Supervised",
    "teacher-student": "softtrain.semi:TeacherStudent",
}


def check_model(name: str) -> None:
    """Refuse a ``--model`` that is neither a name in ``MODELS`` nor a factory
    ``package.module:function`` (imported only when the model is built)."""
    if ":" not in name and name not in MODELS:
        raise ValueError(
            f"unknown model '{name}'; choose from {', '.join(MODELS)}, or give a factory "
            "as package.module:function"
        )


def option(
    default: Any,
    help: str,
    *,
    key: str | None = None,
    choices: tuple | None = None,
    minimum: float | None = None,
    resumable: bool = False,
    shown: str | None = None,
    required: str | None = None,
    aliases: tuple[str, ...] = (),
):
    """A config field: ``help`` for ``--help``; ``key`` the flat name (and flag) when it is
    not the section prefix + field name; ``choices``/``minimum`` checked on creation;
    ``resumable``: a ``--resume`` may change it; ``shown``: the default as ``--help`` says it;
    ``required``: for an option without a default, when it must be given (``--help``);
    ``aliases``: more flags for it."""
    meta = dict(help=help, key=key, choices=choices, minimum=minimum, resumable=resumable,
                shown=shown, required=required, aliases=aliases)  # fmt: skip
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _check(section) -> None:
    """The declared choices and minimums of a section's fields."""
    for f in fields(section):
        value, meta = getattr(section, f.name), f.metadata
        name = "--" + key_of(type(section), f).replace("_", "-")
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(
                f"{name} {value!r}: choose from {', '.join(map(str, meta['choices']))}"
            )
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise ValueError(f"{name} must be at least {meta['minimum']}, got {value}")


def parse_crop(text: str) -> tuple[int, int]:
    """``"256x512"`` -> (256, 512) as (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise ValueError(f"crop '{text}' must be HEIGHTxWIDTH, e.g. 256x512") from e
    if h <= 0 or w <= 0:
        raise ValueError(f"crop '{text}' must be positive")
    return h, w


@dataclass
class DataOptions:
    """What the model sees: the store, crops and scales, the loader."""

    PANEL = "Data"
    PREFIX = ""
    store: str = option(
        "",
        "Store built by 'softprep build'.",
        resumable=True,
        required="unless --config or --resume gives it",
    )  # may move
    crop: str = option("256x512", "Crop HEIGHTxWIDTH.")
    levels: list[str] = option([], "Store levels to draw scales from.", shown="all")
    level_weights: list[float] = option([], "Sampling weight per level.", shown="uniform")
    cat_max_ratio: float = option(
        1.0, "Class-balanced crops (mmseg cat_max_ratio, e.g. 0.75; 1 = off).", minimum=0.0
    )
    workers: int = option(2, "Loader worker processes.", minimum=0, resumable=True)
    photometric: bool = option(
        False, "mmseg's photometric distortion of the training crops (seeded: resume is exact)."
    )

    def __post_init__(self):
        _check(self)
        parse_crop(self.crop)  # refused here, before torch loads
        self.store = absolute_store(self.store) if self.store else self.store


@dataclass
class OptimOptions:
    """The model, the loss and the schedule."""

    PANEL = "Optimisation"
    PREFIX = ""
    regime: str = option(
        "auto",
        "Training method: supervised, teacher-student, or auto (teacher-student when "
        "--labeled is given, else supervised).",
    )
    model: str = option(
        "hrnetv2_w48",
        "Model name ('softtrain models' lists them) or your own factory as "
        "package.module:function (called with the number of classes, returns an nn.Module "
        "whose logits may be at any stride; a dict's 'out' is used).",
    )
    pretrained: str | None = option(
        None, "Local file with the trunk's ImageNet weights (never downloaded).", resumable=True
    )
    batch_size: int = option(
        12,
        "Crops per step and GPU: under torchrun with N processes a step sees N x this; "
        "--lr is used as given (scale it yourself, e.g. linearly).",
        minimum=1,
    )
    accum: int = option(1, "Gradient accumulation steps.", minimum=1)
    iters: int = option(1000, "Optimiser steps.", minimum=1, resumable=True)
    lr: float = option(0.01, "Base learning rate.", resumable=True)
    optimizer: str = option("sgd", "sgd (momentum) or adamw.", choices=("sgd", "adamw"))
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(1e-4, "Weight decay.")
    norm_decay: bool = option(
        True, "Weight decay on normalisation weights and biases too (--no-norm-decay: none)."
    )
    head_lr: float = option(
        1.0, "Learning-rate multiplier of the head (all but the trunk).", minimum=0.0
    )
    power: float = option(0.9, "Poly learning-rate power.")
    warmup_iters: int = option(0, "Linear warm-up steps.", minimum=0)
    loss: str = option(
        "soft", "soft (KL / soft CE) or ce-hard (CE on the argmax label).", choices=LOSSES
    )
    mc: str = option("include", "Multi-class pixels in the loss.", choices=MC_MODES)
    class_weights: str = option(
        "",
        "Per-class loss weights: inverse-sqrt (of the training pixels' class shares; "
        "teacher-student: of the labelled share's) or one number per class, comma-separated.",
        shown="none",
    )
    ohem_thresh: float = option(
        0.0,
        "OHEM: train on the pixels whose target's expected probability is below this "
        "(mmseg's 0.7); 0: off.",
        minimum=0.0,
    )
    ohem_min_kept: int = option(100000, "OHEM: at least this many pixels per image.", minimum=1)
    ema: float = option(
        0.0, "Weight EMA of the model, evaluated and saved as best.pt (e.g. 0.9999; 0: off).",
        minimum=0.0,
    )  # fmt: skip
    seed: int = option(0, "Random seed.", minimum=0)

    def __post_init__(self):
        _check(self)
        check_model(self.model)  # refused here, before torch loads
        if self.lr <= 0:
            raise ValueError("--lr must be positive")
        if not self.ema < 1:
            raise ValueError("--ema must be in [0, 1)")
        if self.regime not in ("auto", *REGIMES):
            raise ValueError(f"--regime {self.regime!r}: choose from auto, {', '.join(REGIMES)}")


@dataclass
class RunOptions:
    """Where the run goes and what it leaves: evaluations, checkpoints, logs."""

    PANEL = "Evaluation, checkpoints, logs"
    PREFIX = ""
    out: str = option(
        "runs/run",
        "Run folder: config.toml, metrics.jsonl, last.pt, best.pt, curves.png, tb/.",
        resumable=True,
    )
    eval_every: int = option(0, "Evaluate every N steps (0: only at the end).", minimum=0,
                             resumable=True)  # fmt: skip
    eval_level: str = option(
        "", "Level to evaluate at.", shown="the largest training level", resumable=True
    )
    eval_split: str = option(
        "val", f"Split to evaluate on; {NO_EVAL}: train unevaluated (no best.pt), as a store "
        "without evaluation splits does.", resumable=True,
    )  # fmt: skip
    save_every: int = option(
        500, "Save last.pt every N steps (0: only at evaluations and the end).", minimum=0,
        resumable=True,
    )  # fmt: skip
    keep_checkpoints: int = option(
        0, "Also keep the last N checkpoints as iter_<step>.pt.", minimum=0, resumable=True
    )
    tensorboard: bool = option(
        False, "TensorBoard scalars, prediction images and options in <out>/tb "
        "(needs the tensorboard package).",
        resumable=True,
    )  # fmt: skip
    mlflow: str = option(
        "", "MLflow tracking URI (file:./mlruns or a server; needs the mlflow package).",
        shown="off", resumable=True,
    )  # fmt: skip
    tracker: str = option(
        "", "Your experiment tracker as package.module:Class (a Tracker, see the module "
        "softtrain.tracking).",
        shown="none", resumable=True,
    )  # fmt: skip
    log_every: int = option(10, "Progress/metrics every N steps.", minimum=1, resumable=True)

    def __post_init__(self):
        _check(self)
        if self.tensorboard and find_spec("tensorboard") is None:
            raise ValueError(
                "--tensorboard needs the tensorboard package: pip install 'softprep[tensorboard]'"
            )
        if self.mlflow and find_spec("mlflow") is None:
            raise ValueError("--mlflow needs the mlflow package: pip install 'softprep[mlflow]'")


@dataclass
class SpeedOptions:
    """Device and speed knobs; they change nothing but time and precision."""

    PANEL = "Speed (GPU), several GPUs"
    PREFIX = ""
    device: str = option("auto", "cuda, cpu or auto.", resumable=True)
    bf16: bool = option(False, "bf16 autocast (GPU).", resumable=True)
    fp16: bool = option(False, "fp16 autocast with a gradient scaler (GPUs without bf16).")
    channels_last: bool = option(False, "channels_last memory format (GPU).", resumable=True)
    compile: bool = option(False, "torch.compile the model (GPU; slow first step).",
                           resumable=True)  # fmt: skip
    sync_bn: bool = option(False, "SyncBatchNorm across GPUs (under torchrun).")

    def __post_init__(self):
        _check(self)
        if self.bf16 and self.fp16:
            raise ValueError("give --bf16 or --fp16, not both")


@dataclass
class WeakOptions:
    """How unlabelled pixels of a weak store are supervised (``softtrain.weak_losses``)."""

    PANEL = "Weak supervision"
    PREFIX = "weak_"
    loss: str = option(
        "none",
        "none = CE on the labelled pixels; potts = + dense Potts on the predictions; "
        "self-label = + soft pseudo-labels.",
        choices=WEAK_LOSSES,
    )
    potts: str = option("collision-divergence", "Potts relaxation.", choices=POTTS)
    xent: str = option("collision", "Pseudo-label cross-entropy.", choices=XENT)
    eta: float = option(1.0, "Weight of H(y, s).")
    # Pair terms are averaged per pixel: at 1 the pseudo-labels barely leave the predictions
    # (bench_weak on generated scenes: +0.3 mIoU over the predictions at 1, +1.4..2.7 at 10).
    lam: float = option(10.0, "Weight of the Potts term.", key="weak_lambda")
    sigma: float = option(3.0, "Colour bandwidth of the pair weights, 0..255.")
    neighbours: int = option(4, "Pairs: 4 or 8 neighbours.", choices=(4, 8))
    steps: int = option(200, "Pseudo-label solver steps.", minimum=0)
    step_lr: float = option(0.075, "Pseudo-label solver step.")
    start: int = option(0, "Steps of CE on the labelled pixels before the weak term.", minimum=0)

    def __post_init__(self):
        _check(self)


@dataclass
class SemiOptions:
    """Semi-supervised teacher-student training (``softtrain.semi``)."""

    PANEL = "Semi-supervised"
    PREFIX = "semi_"
    labeled: str = option(
        "",
        "The labelled share of the training split, a fraction (1/8) or a partition list file "
        "(lines starting with image names); the rest, and the store's image-only splits "
        "(softprep build --split train_extra, --unlabeled DIR), are unlabelled "
        "(teacher-student).",
        key="labeled",
        shown="all labelled",
        aliases=("--labeled-list",),
    )
    labeled_seed: int = option(0, "Seed of the --labeled choice.", key="labeled_seed")
    unlabeled_batch: int = option(
        0, "Unlabelled crops per step and GPU (0: --batch-size).", key="unlabeled_batch",
        minimum=0,
    )  # fmt: skip
    threshold: float = option(
        0.95, "Teacher confidence for hard pseudo-labels, in [0, 1].", minimum=0.0
    )
    esl: bool = option(False, "ESL dynamic soft labels below the threshold.")
    esl_weight: float = option(0.2, "Weight of the ESL term.", minimum=0.0)
    ipix: str = option("none", "IPixMatch inter-pixel loss.", choices=IPIX)
    ipix_weight: float = option(1.0, "Weight of the inter-pixel loss.", minimum=0.0)
    ipix_pixels: int = option(256, "Pixels sampled for it.", minimum=1)
    ema: float = option(0.999, "Teacher EMA momentum, in [0, 1).", minimum=0.0)
    cutmix: bool = option(True, "CutMix in the strong view.")
    eval: str = option(
        "teacher", "Evaluate (and predict with) the teacher or the student.",
        choices=("teacher", "student"),
    )  # fmt: skip

    def __post_init__(self):
        _check(self)
        if not self.ema < 1:
            raise ValueError("--semi-ema must be in [0, 1)")
        if self.threshold > 1:  # no pixel would ever be confident
            raise ValueError(f"--semi-threshold must be in [0, 1], got {self.threshold}")


SECTIONS = {
    "data": DataOptions,
    "optim": OptimOptions,
    "run": RunOptions,
    "speed": SpeedOptions,
    "weak": WeakOptions,
    "semi": SemiOptions,
}


def key_of(section: type, f) -> str:
    """The flat key (and, dashed, the flag) of field ``f`` of ``section``."""
    return f.metadata.get("key") or section.PREFIX + f.name


@dataclass(frozen=True)
class Declared:
    """One option as the command line and flat configs know it."""

    key: str  # flat key, e.g. "weak_lambda"; the flag is "--weak-lambda"
    section: str  # attribute of FitConfig, e.g. "weak"
    name: str  # field of the section, e.g. "lam"
    type: Any  # str, int, float, bool, list[str], list[float]
    default: Any
    help: str
    panel: str
    resumable: bool
    shown: str | None
    required: str | None
    aliases: tuple[str, ...]
    choices: tuple | None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def declared() -> dict[str, Declared]:
    """Every option by flat key, in declaration order."""
    found = {}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            kind = hints[f.name]
            kind = str if kind == (str | None) else kind
            found[key_of(cls, f)] = Declared(
                key_of(cls, f), section, f.name, kind, default, f.metadata["help"],
                cls.PANEL, f.metadata["resumable"], f.metadata["shown"], f.metadata["required"],
                f.metadata["aliases"], f.metadata["choices"],
            )  # fmt: skip
    return found


def absolute_store(url: str) -> str:
    """A local store path made absolute (so a config replays from anywhere); URLs as given."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().absolute())


@dataclass
class FitConfig:
    """Every option of a run, by section; ``softtrain fit --config <out>/config.toml``
    repeats it. ``FitConfig.of(store=..., batch_size=2)`` builds one from flat keys."""

    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    run: RunOptions = field(default_factory=RunOptions)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    weak: WeakOptions = field(default_factory=WeakOptions)
    semi: SemiOptions = field(default_factory=SemiOptions)

    def __post_init__(self):
        if not self.data.store:
            raise ValueError("give --store STORE (or --config run/config.toml)")
        if self.regime != "teacher-student":  # its options would be ignored, silently
            given = [f"--{key_of(SemiOptions, f).replace('_', '-')}" for f in fields(SemiOptions)
                     if getattr(self.semi, f.name) != f.default]  # fmt: skip
            if given:
                raise ValueError(
                    f"{', '.join(given)}: options of the teacher-student regime, which a "
                    f"{self.regime} run ignores; drop them, or train teacher-student (--labeled "
                    "with --regime auto or teacher-student)"
                )

    @classmethod
    def of(cls, **flat) -> FitConfig:
        """A config from flat keys (``batch_size``, ``weak_lambda``, ``labeled``, ...);
        unknown keys are refused, the rest take their defaults."""
        options = declared()
        unknown = sorted(set(flat) - set(options))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}")
        by_section: dict[str, dict] = {s: {} for s in SECTIONS}
        for key, value in flat.items():
            by_section[options[key].section][options[key].name] = value
        return cls(**{s: SECTIONS[s](**kw) for s, kw in by_section.items()})

    def flat(self) -> dict[str, Any]:
        """Every option by flat key (what checkpoints record)."""
        return {d.key: getattr(getattr(self, d.section), d.name) for d in declared().values()}

    def with_flat(self, **flat) -> FitConfig:
        """This config with the non-None flat ``flat`` options replaced."""
        return FitConfig.of(**(self.flat() | {k: v for k, v in flat.items() if v is not None}))

    @property
    def regime(self) -> str:
        """The training method this config runs (``auto`` resolved)."""
        if self.optim.regime != "auto":
            return self.optim.regime
        return "teacher-student" if self.semi.labeled else "supervised"

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> FitConfig:
        """The config in ``path`` (one table per section, or the flat form of earlier
        versions) with the non-None flat ``overrides`` applied."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        options = declared()
        flat = {}
        for name, value in data.items():
            if name in SECTIONS and isinstance(value, dict):
                names = {d.name: d.key for d in options.values() if d.section == name}
                unknown = sorted(set(value) - set(names))
                if unknown:
                    raise ValueError(f"{path}: unknown option(s) {unknown} in [{name}]")
                flat |= {names[k]: v for k, v in value.items()}
            elif name in options:
                flat[name] = value
            else:
                raise ValueError(f"{path}: unknown option(s) {[name]}")
        try:
            return cls.of(**(flat | {k: v for k, v in overrides.items() if v is not None}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_toml(self) -> str:
        lines = []
        for section in SECTIONS:
            lines.append(f"[{section}]")
            for f in fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                if value is not None:  # JSON scalars/arrays are valid TOML here
                    lines.append(f"{f.name} = {json.dumps(value)}")
            lines.append("")
        return "\n".join(lines)

    def changed_for_resume(self, saved: dict) -> list[str]:
        """Flat keys that differ from a checkpoint's (flat) config and may not change on
        resume: everything that touches the weights' history or the data order."""
        mine, options = self.flat(), declared()
        return sorted(
            k for k in mine
            if not options[k].resumable and k in saved and saved[k] != mine[k]
        )  # fmt: skip
