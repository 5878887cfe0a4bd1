"""Training and evaluation on a softprep store: read it top to bottom.

``fit``: SGD (momentum, weight decay) with a poly learning rate (optional linear warm-up)
on random-scale crops; the loss is soft cross-entropy on the densified soft labels (or hard
CE on their argmax). Every ``eval_every`` steps and at the end the model is evaluated on
the store's evaluation split at full resolution (logits upsampled bilinearly), ``last.pt``
is written and ``best.pt`` kept for the best mIoU. ``resume`` continues exactly: model,
optimiser, schedule, step, data order and RNG states come from ``last.pt``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from softprep.store import SoftStore, parse_scale, scale_label
from softtrain.data import CropDataset, EvalDataset, parse_crop
from softtrain.losses import LOSSES, soft_label_loss
from softtrain.metrics import Confusion
from softtrain.models import MODELS, build_model, normalise


class TrainingError(RuntimeError):
    """Training had to stop (non-finite loss, mismatched checkpoint); the message says why."""


@dataclass
class FitConfig:
    """Every option of a run; written to ``<out>/config.toml`` so it can be repeated."""

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
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss '{self.loss}'; choose from {', '.join(LOSSES)}")
        if self.mc not in ("include", "exclude"):
            raise ValueError(f"mc must be include or exclude, got '{self.mc}'")
        if self.model not in MODELS:
            raise ValueError(f"unknown model '{self.model}'; choose from {', '.join(MODELS)}")
        parse_crop(self.crop)
        for name in ("batch_size", "accum", "iters", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> FitConfig:
        data = tomllib.loads(Path(path).read_text())
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class RunSampler(Sampler):
    """Sample indices for a whole run: epoch after epoch, each a fresh permutation from
    (seed, epoch) cut to whole batches, encoded as ``epoch * n + item`` (so loader workers
    need no epoch updates) and starting at batch ``start`` (for resuming).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.per_epoch = n // batch_size

    def __iter__(self):
        epoch, skip = divmod(self.start, self.per_epoch)
        skip *= self.batch_size
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[: self.per_epoch * self.batch_size]
            yield from (epoch * self.n + perm[skip:]).tolist()
            epoch, skip = epoch + 1, 0


def poly_lr(step: int, cfg: FitConfig) -> float:
    """Learning-rate factor at ``step``: linear warm-up, then (1 - t)^power."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    return (1 - step / max(1, cfg.iters)) ** cfg.power


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **content) -> None:
    """Atomic: a crash while saving leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(content, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, classes: list[dict] | None = None) -> dict:
    """A checkpoint, refused if its class table differs from ``classes``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if classes is not None and ckpt["classes"] != classes:
        raise TrainingError(
            f"{path} was trained on another class table ({len(ckpt['classes'])} classes: "
            f"{', '.join(c['name'] for c in ckpt['classes'][:4])}, ...) than this store "
            f"({len(classes)} classes: {', '.join(c['name'] for c in classes[:4])}, ...)"
        )
    return ckpt


@torch.no_grad()
def evaluate(
    model, dataset: EvalDataset, num_classes: int, device, bf16: bool = False, progress=None
) -> Confusion:
    """Whole images at the dataset's level; logits upsampled bilinearly to full resolution."""
    model.eval()
    confusion = Confusion(num_classes, device)
    loader = DataLoader(dataset, batch_size=1, num_workers=0, generator=torch.Generator())
    for n, batch in enumerate(loader):
        image = normalise(batch["image"].to(device))
        label = batch["label"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(image)
        logits = F.interpolate(
            logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False
        )
        confusion.update(logits.argmax(1), label)
        if progress:
            progress(n + 1, len(dataset))
    model.train()
    return confusion


@dataclass
class StepLog:
    step: int
    loss: float
    kl: float
    lr: float
    crops_per_s: float
    data_wait_share: float
    peak_memory_gib: float  # CUDA peak allocated since the start (0 on CPU)


def fit(cfg: FitConfig, resume: bool = False, on_log=None, on_eval=None) -> dict:
    """Train per ``cfg``; returns {"best_miou", "last_miou", "step"}. ``on_log(StepLog)``
    and ``on_eval(step, Confusion)`` report progress."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    store = SoftStore(cfg.store)
    classes = store.classes
    train = CropDataset(
        cfg.store,
        parse_crop(cfg.crop),
        "train",
        cfg.levels or None,
        cfg.level_weights or None,
        cat_max_ratio=cfg.cat_max_ratio,
        seed=cfg.seed,
    )
    eval_level = cfg.eval_level or scale_label(max(train.scales))
    evalset = EvalDataset(cfg.store, eval_level, cfg.eval_split)
    model = build_model(cfg.model, len(classes), cfg.pretrained).to(device)
    out = Path(cfg.out)  # written only once the inputs are known to be usable
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(cfg.to_toml())
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: poly_lr(s, cfg))
    step, best, last_miou = 0, -1.0, float("nan")
    if resume:
        ckpt = load_checkpoint(out / "last.pt", classes)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, best = ckpt["step"], ckpt["best_miou"]
        _set_rng_state(ckpt["rng"])
    if len(train) < cfg.batch_size:
        raise TrainingError(
            f"{cfg.store}: {len(train)} training images, fewer than one batch of {cfg.batch_size}"
        )
    micro = step * cfg.accum  # micro-batches consumed so far
    meta = {
        "classes": classes,
        "config": asdict(cfg),
        "store_meta": {k: store.meta[k] for k in ("kernel", "antialias", "short_side", "dataset")},
        "eval_level": eval_level,
    }

    def checkpoint(path: Path) -> None:
        save_checkpoint(
            path,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            step=step,
            best_miou=best,
            rng=_rng_state(),
            **meta,
        )

    def run_eval() -> float:
        nonlocal best
        confusion = evaluate(model, evalset, len(classes), device, cfg.bf16)
        miou = confusion.miou()
        if on_eval:
            on_eval(step, confusion)
        if miou > best:
            best = miou
            checkpoint(out / "best.pt")
        checkpoint(out / "last.pt")
        return miou

    model.train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size
    loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        sampler=RunSampler(len(train), cfg.batch_size, cfg.seed, micro),
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        prefetch_factor=4 if cfg.workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG untouched
    )
    batches = iter(loader)
    t_log, wait, seen = time.perf_counter(), 0.0, 0
    while step < cfg.iters:
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        image = normalise(batch["image"].to(device, non_blocking=True))
        if cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        index = batch["index"].to(device, non_blocking=True)
        prob = batch["prob"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = step_model(image)
        logits = F.interpolate(
            logits.float(), size=index.shape[-2:], mode="bilinear", align_corners=False
        )
        out_loss = soft_label_loss(logits, index, prob, cfg.loss, cfg.mc)
        value = out_loss.loss.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"loss is {value} at step {step}; stopped. The last good checkpoint "
                f"({out / 'last.pt'}) is intact: lower --lr or add --warmup-iters, then --resume"
            )
        (out_loss.loss / cfg.accum).backward()
        micro += 1
        seen += image.shape[0]
        if micro % cfg.accum:
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        if on_log and (step % cfg.log_every == 0 or step == cfg.iters):
            elapsed = time.perf_counter() - t_log
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            lr_now = scheduler.get_last_lr()[0]
            kl = out_loss.kl.item()
            on_log(StepLog(step, value, kl, lr_now, seen / elapsed, wait / elapsed, peak))
            t_log, wait, seen = time.perf_counter(), 0.0, 0
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.iters:
            last_miou = run_eval()
    last_miou = run_eval()
    return {"best_miou": best, "last_miou": last_miou, "step": step}


def eval_checkpoint(
    checkpoint: str,
    store_url: str,
    level: str | None = None,
    split: str = "val",
    device: str = "auto",
    bf16: bool = False,
    progress=None,
) -> Confusion:
    """Evaluate a checkpoint on a store's evaluation split at full resolution."""
    store = SoftStore(store_url)
    ckpt = load_checkpoint(checkpoint, store.classes)
    dev = resolve_device(device)
    model = build_model(ckpt["config"]["model"], len(store.classes)).to(dev)
    model.load_state_dict(ckpt["model"])
    dataset = EvalDataset(store_url, level or ckpt["eval_level"], split)
    return evaluate(model, dataset, len(store.classes), dev, bf16, progress)


def predict(checkpoint: str, images: list[Path], out_dir: Path, device: str = "auto") -> list[Path]:
    """Label PNGs (palette = class colours) and colour overlays for images on disk.

    Each image is down-sampled as the store was (kernel, scale of the checkpoint's
    evaluation level), and the logits are upsampled bilinearly to its full resolution.
    """
    from PIL import Image

    from softprep.build import level_size
    from softprep.datasets import decode_image
    from softprep.resample import Resampler

    ckpt = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    classes = ckpt["classes"]
    model = build_model(ckpt["config"]["model"], len(classes)).to(dev).eval()
    model.load_state_dict(ckpt["model"])
    meta = ckpt["store_meta"]
    scale = parse_scale(ckpt["eval_level"])
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(classes)] = [c["color"] for c in classes]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        rgb = decode_image(path)
        hw = rgb.shape[:2]
        small = Resampler.make(
            hw, level_size(hw, scale, meta["short_side"]), meta["kernel"], meta["antialias"]
        ).colour(rgb)
        x = normalise(
            torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1)))[None].to(dev)
        )
        with torch.no_grad():
            logits = F.interpolate(model(x).float(), size=hw, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        label = Image.fromarray(pred, "P")
        label.putpalette(palette.ravel().tolist())
        stem = Path(path).stem
        label.save(out_dir / f"{stem}_label.png")
        overlay = (0.5 * rgb + 0.5 * palette[pred]).astype(np.uint8)
        Image.fromarray(overlay).save(out_dir / f"{stem}_overlay.png")
        written += [out_dir / f"{stem}_label.png", out_dir / f"{stem}_overlay.png"]
    return written
