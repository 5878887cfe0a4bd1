"""``FitConfig``: every option of a training run, written to ``<out>/config.toml``.

Light on purpose (no torch import), so ``softtrain --help`` answers at once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib.util import find_spec
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

LOSSES = ("soft", "ce-hard")
MC_MODES = ("include", "exclude")
WEAK_LOSSES = ("none", "potts", "self-label")  # softtrain.weak
POTTS = (
    "bilinear",
    "quadratic",
    "normalised-quadratic",
    "collision-ce",
    "collision-divergence",
    "log-quadratic",
)
XENT = ("standard", "reverse", "collision")

# Options a resumed run may change: they touch neither the weights' history nor the data
# order. Everything else must equal the checkpoint's run, or the resume is refused.
RESUMABLE = frozenset(
    {
        "out",
        "store",  # the same store (build id checked) may have moved
        "iters",
        "lr",
        "workers",
        "device",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "eval_every",
        "eval_level",
        "eval_split",
        "tensorboard",
        "pretrained",  # the checkpoint's weights replace it anyway
        "bf16",  # speed/precision knobs apply from the resumed step on
        "channels_last",
        "compile",
    }
)


def absolute_store(url: str) -> str:
    """A local store path made absolute (so a config replays from anywhere); URLs as given."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().absolute())


@dataclass
class FitConfig:
    """Every option of a run; ``softtrain fit --config <out>/config.toml`` repeats it."""

    store: str
    out: str = "runs/run"
    model: str = "hrnetv2_w48"
    pretrained: str | None = None
    crop: str = "256x512"
    levels: list[str] = field(default_factory=list)  # empty: every level of the store
    level_weights: list[float] = field(default_factory=list)
    cat_max_ratio: float = 1.0
    batch_size: int = 12
    accum: int = 1
    iters: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    warmup_iters: int = 0
    loss: str = "soft"
    mc: str = "include"
    workers: int = 2
    eval_every: int = 0  # 0: only at the end
    eval_level: str = ""  # empty: the largest training level
    eval_split: str = "val"
    save_every: int = 500  # last.pt every N steps (0: only at evaluations and the end)
    keep_checkpoints: int = 0  # also keep the last N iter_<step>.pt
    tensorboard: bool = False
    sync_bn: bool = False  # SyncBatchNorm across GPUs under torchrun
    # weak supervision (softtrain.weak), for stores whose unlabelled pixels are void
    weak_loss: str = "none"  # none: CE on labelled pixels; potts; self-label
    weak_potts: str = "collision-divergence"
    weak_xent: str = "collision"
    weak_eta: float = 1.0  # weight of H(y, s) (self-label)
    # weight of the Potts term; pair terms are averaged per pixel, and at 1 the pseudo-labels
    # barely leave the predictions (bench_weak's solver figure on generated scenes: +0.3
    # mIoU over the predictions at 1, +1.4 to +2.7 at 10)
    weak_lambda: float = 10.0
    weak_sigma: float = 3.0  # colour bandwidth of the pair weights, 0..255 units
    weak_neighbours: int = 4
    weak_steps: int = 200  # pseudo-label solver steps
    weak_step_lr: float = 0.075  # pseudo-label solver step size
    weak_start: int = 0  # steps of CE on the labelled pixels before the weak term starts
    # semi-supervised (softtrain.semi): a labelled share of the training split, the rest
    # unlabelled, teacher-student
    labeled: str = ""  # a fraction ("1/8") or a partition list file; empty: all labelled
    labeled_seed: int = 0  # the partition's seed (fixed across training seeds)
    unlabeled_batch: int = 0  # unlabelled crops per step (0: --batch-size)
    semi_threshold: float = 0.95  # teacher confidence for hard pseudo-labels
    semi_esl: bool = False  # dynamic soft labels below the threshold
    semi_esl_weight: float = 0.2
    semi_ipix: str = "none"  # inter-pixel loss: none, kl, corr
    semi_ipix_weight: float = 1.0
    semi_ipix_pixels: int = 256
    semi_ema: float = 0.999  # teacher momentum
    semi_cutmix: bool = True
    semi_eval: str = "teacher"  # evaluate (and save for eval/predict) the teacher or student
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss '{self.loss}'; choose from {', '.join(LOSSES)}")
        if self.mc not in MC_MODES:
            raise ValueError(f"mc must be include or exclude, got '{self.mc}'")
        for value, allowed, name in (
            (self.weak_loss, WEAK_LOSSES, "weak_loss"),
            (self.weak_potts, POTTS, "weak_potts"),
            (self.weak_xent, XENT, "weak_xent"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} '{value}'; choose from {', '.join(allowed)}")
        if self.weak_neighbours not in (4, 8):
            raise ValueError("weak_neighbours must be 4 or 8")
        if self.semi_ipix not in ("none", "kl", "corr"):
            raise ValueError(f"semi_ipix must be none, kl or corr, got '{self.semi_ipix}'")
        if self.semi_eval not in ("teacher", "student"):
            raise ValueError(f"semi_eval must be teacher or student, got '{self.semi_eval}'")
        if not 0 <= self.semi_ema < 1:
            raise ValueError("semi_ema must be in [0, 1)")
        if self.tensorboard and find_spec("tensorboard") is None:
            raise ValueError(
                "--tensorboard needs the tensorboard package: pip install 'softprep[tensorboard]'"
            )
        for name in ("batch_size", "accum", "iters", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("save_every", "keep_checkpoints", "eval_every", "warmup_iters", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        self.store = absolute_store(self.store)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> FitConfig:
        """The config in ``path`` with the non-None ``overrides`` applied."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {sorted(unknown)}")
        return cls(**(data | {k: v for k, v in overrides.items() if v is not None}))

    def to_toml(self) -> str:
        lines = []
        for k, v in asdict(self).items():
            if v is None:
                continue
            lines.append(f"{k} = {json.dumps(v)}")  # JSON scalars/arrays are valid TOML here
        return "\n".join(lines) + "\n"

    def changed_for_resume(self, saved: dict) -> list[str]:
        """Options that differ from a checkpoint's config and may not change on resume."""
        mine = asdict(self)
        return sorted(k for k in mine if k not in RESUMABLE and k in saved and saved[k] != mine[k])
