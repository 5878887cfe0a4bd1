"""Semi-supervised training: a labelled share of the training split plus the rest of it as
unlabelled images, teacher-student with soft pseudo-labels.

- Partition (``partition``): ``labeled`` as a fraction (``1/8``; a seeded choice) or a list
  file of image names (the standard partition files); the rest of the split is unlabelled,
  with the store's image-only splits (``softprep build --split train_extra``,
  ``--unlabeled DIR``).
- Teacher: an exponential moving average of the student (``ema``), updated after every
  optimiser step, parameters and buffers: t = m t + (1 - m) s, with m warmed up as
  min(ema, 1 - 1 / (step + 1)) (the mean-teacher practice); under DDP every rank's teacher
  then takes rank 0's buffers (``ema_follow``), the teacher checkpoints hold.
- Views: the teacher sees the unlabelled crop as the loader gives it (random scale, crop,
  flip: the weak view); the student a strong view computed on the device (colour jitter,
  random grayscale, Gaussian blur, CutMix between the batch's images), seeded by
  (seed, rank, micro-batch) so a resumed run draws the same views.
- Unsupervised losses on the strong view, summed, on image pixels only (never on the
  padding of crops larger than their image, nor where CutMix pasted such padding):
  hard pseudo-labels where the teacher's confidence reaches ``threshold`` (CE, averaged over
  all unlabelled image pixels); ESL's dynamic soft labels on the pixels below it (Ma et al.,
  ICCV 2023: the smallest set of top teacher classes whose probability reaches a curriculum
  threshold tau, renormalised, soft CE averaged over those below-threshold pixels, weight
  ``esl_weight``; tau moves linearly from 0.5 to ``threshold`` over the run); IPixMatch's
  inter-pixel loss (Wu, Li and Xiao: on ``ipix_pixels`` sampled confident pixels, the
  row-normalised relation matrix P P^T of the student aligned with the teacher's by KL, or
  1 - the row-wise Pearson correlation).
- The unlabelled share's labels are never read (``CropDataset.subset(labels=False)``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from softtrain.augment import STRONG_VIEW, draws
from softtrain.config import FitConfig
from softtrain.data import normalise, valid_mask
from softtrain.loader import batches, run_loader
from softtrain.losses import LossOutput
from softtrain.regime import Forward, RunData, ema_follow
from softtrain.supervised import Supervised, image_pixels, upsample

EPS = 1e-8


def partition(
    names: np.ndarray, items: np.ndarray, labeled: str, seed: int, image_suffix: str = ""
):
    """(labelled, unlabelled) item numbers of a split's ``items`` (store image numbers).

    ``labeled``: a fraction (``"1/8"``, ``"0.125"``: a seeded random choice, at least one
    image) or the path of a list file whose lines start with image file names (other
    columns ignored, as in the usual partition files). A line names an image when its file
    name, less the dataset's ``image_suffix`` (or else its extension), equals the image's
    stored name (its file name below the split folder, less the suffix) whole: never a
    prefix. A line matching no image, or several, is refused."""
    from fractions import Fraction

    try:
        share = float(Fraction(labeled))
    except ValueError:
        share = None  # not a number: a list file
    except (ZeroDivisionError, OverflowError):  # 1/0, 1e400
        raise ValueError(f"--labeled {labeled}: not a fraction in (0, 1]") from None
    if share is not None:
        if not 0 < share <= 1:
            raise ValueError(f"--labeled {labeled}: not a fraction in (0, 1]")
        order = np.random.default_rng(seed).permutation(len(items))
        return _split(items, items[order[: max(1, round(share * len(items)))]])
    path = Path(labeled)
    if not path.is_file():
        raise FileNotFoundError(f"{labeled}: not a fraction nor a partition list file")
    by_stem: dict[str, list[int]] = {}
    for i, n in zip(items, names[items]):
        by_stem.setdefault(str(n).rsplit("/", 1)[-1], []).append(int(i))
    wanted, missing, ambiguous = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        base = line.split()[0].replace("\\", "/").rsplit("/", 1)[-1]
        if image_suffix and base.endswith(image_suffix):
            stem = base[: -len(image_suffix)]
        else:
            stem = base.rsplit(".", 1)[0] if "." in base else base
        found = by_stem.get(stem, [])
        if len(found) > 1:
            ambiguous.append(f"line {number} '{base}'")
        (wanted if found else missing).extend(found or [f"line {number} '{base}'"])
    if not wanted and not missing:
        raise ValueError(f"{path}: a partition list file that names no image")
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} name(s) match no training image, e.g. "
            f"{', '.join(missing[:3])} (names must match whole)"
        )
    if ambiguous:
        raise ValueError(
            f"{path}: {', '.join(ambiguous[:3])} match(es) several training images (in "
            "different folders); a partition list must name each image once"
        )
    return _split(items, np.array(sorted(set(wanted)), dtype=items.dtype))


def _split(items: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.sort(chosen), np.setdiff1d(items, chosen)


def dynamic_soft_labels(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """ESL: per pixel, the smallest set of top classes whose probability sum reaches ``tau``,
    renormalised; (B, C, H, W) -> (B, C, H, W), zeros elsewhere."""
    sorted_p, order = probs.sort(dim=1, descending=True)
    before = sorted_p.cumsum(1) - sorted_p  # mass of the classes ranked above
    keep_sorted = before < tau  # keep a class while the ones above have not reached tau
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(1, keepdim=True).clamp_min(EPS)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """IPixMatch inter-pixel loss of (N, C) student and teacher distributions: their
    relation matrices P P^T (N, N), row-normalised, compared by KL(teacher || student)
    ("kl") or by 1 - the row-wise Pearson correlation ("corr"); mean over rows."""
    rs, rt = student @ student.T, teacher @ teacher.T
    if kind == "kl":
        ps = rs / rs.sum(1, keepdim=True).clamp_min(EPS)
        pt = rt / rt.sum(1, keepdim=True).clamp_min(EPS)
        return (pt * (torch.log(pt.clamp_min(EPS)) - torch.log(ps.clamp_min(EPS)))).sum(1).mean()
    cs, ct = rs - rs.mean(1, keepdim=True), rt - rt.mean(1, keepdim=True)
    corr = (cs * ct).sum(1) / (cs.norm(dim=1) * ct.norm(dim=1)).clamp_min(EPS)
    return (1 - corr).mean()


def strong_view(image: torch.Tensor, generator: torch.Generator, valid: torch.Tensor):
    """(B, 3, H, W) uint8 -> float 0..255 strong view: colour jitter as torchvision's
    (brightness; contrast about the mean grey of the image pixels ``valid`` (B, H, W) bool;
    saturation against the current grey; each factor in [0.6, 1.4], clamped after each),
    grayscale (luma) with p 0.2, 5x5 Gaussian blur (sigma 0.1..2) with p 0.5; ``generator``
    (CPU) draws every choice."""
    b = image.shape[0]
    x = image.float()

    def draw(*shape):
        return torch.rand(*shape, generator=generator).to(image.device)

    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)

    def luma(x):  # (B, 1, H, W): the grey of the image as it is now
        return (x * weights).sum(1, keepdim=True)

    x = (x * (0.6 + 0.8 * draw(b, 1, 1, 1))).clamp(0, 255)  # brightness
    inside = valid[:, None].float()  # (B, 1, H, W)
    mean = (luma(x) * inside).sum((2, 3), keepdim=True) / inside.sum(
        (2, 3), keepdim=True
    ).clamp_min(1)
    x = (mean + (x - mean) * (0.6 + 0.8 * draw(b, 1, 1, 1))).clamp(0, 255)  # contrast
    grey = luma(x)
    x = (grey + (x - grey) * (0.6 + 0.8 * draw(b, 1, 1, 1))).clamp(0, 255)  # saturation
    x = torch.where(draw(b, 1, 1, 1) < 0.2, luma(x).expand_as(x), x)  # grayscale
    sigma = 0.1 + 1.9 * draw(b)
    taps = torch.arange(-2, 3, device=x.device).float()
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, 5)
    edged = _edge_filled(x, valid)  # the blur reads image edges, never black padding
    blurred = torch.stack([_blur(edged[i : i + 1], kernel[i]) for i in range(b)])[:, 0]
    x = torch.where(draw(b, 1, 1, 1) < 0.5, blurred, x)
    return x.clamp(0, 255)


def _edge_filled(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) with each image's pixels outside its ``valid`` rectangle (B, H, W) bool
    replaced by the nearest image pixel (its edge row or column, repeated)."""
    h, w = x.shape[-2:]
    rows, cols = valid.any(2), valid.any(1)  # (B, H), (B, W)
    top, bottom = rows.float().argmax(1), h - 1 - rows.flip(1).float().argmax(1)
    left, right = cols.float().argmax(1), w - 1 - cols.flip(1).float().argmax(1)
    r = torch.arange(h, device=x.device)[None].clamp(top[:, None], bottom[:, None])  # (B, H)
    c = torch.arange(w, device=x.device)[None].clamp(left[:, None], right[:, None])  # (B, W)
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2)


def _blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    x = F.conv2d(
        F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c
    )
    return F.conv2d(
        F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c
    )


def cutmix_boxes(b: int, hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(B, H, W) bool: a random box per image (half the area on average), pasted from the
    previous image of the batch (``roll(1, 0)``)."""
    h, w = hw
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):
        ratio = math.sqrt(float(torch.rand(1, generator=generator)) * 0.5 + 0.25)
        bh, bw = max(1, int(h * ratio)), max(1, int(w * ratio))
        y = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
        x = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
        mask[i, y : y + bh, x : x + bw] = True
    return mask


class TeacherStudent(Supervised):
    """The teacher-student regime: each micro-batch holds a labelled batch (the supervised
    loss) and an unlabelled one from this regime's own loader (the unsupervised losses
    against the teacher); the teacher follows the student after every step, is saved in
    every checkpoint (key ``teacher``) and is what is evaluated unless ``--semi-eval
    student``."""

    def __init__(self, cfg: FitConfig, data: RunData):
        super().__init__(cfg, data)
        self.opts = cfg.semi
        if not cfg.semi.labeled:
            raise ValueError(
                "--regime teacher-student needs --labeled: the labelled share, a fraction "
                "(1/8) or a partition list file"
            )
        train, ranks, store = data.train, data.ranks, data.store
        in_train = store.split_of()[train.items] == "train"
        labelled, rest = partition(
            store.names(), train.items[in_train], cfg.semi.labeled, cfg.semi.labeled_seed,
            store.manifest.layout["image_suffix"],
        )  # fmt: skip
        rest = np.union1d(rest, train.items[~in_train])
        self.train_on_labels(labelled)  # class weights count the labelled share only
        self.labelled = train.subset(labelled, cfg.optim.seed)
        self.unlabelled = train.subset(rest, cfg.optim.seed + 1, labels=False)  # never read
        self.per_rank = cfg.semi.unlabeled_batch or cfg.optim.batch_size
        if len(self.unlabelled) < self.per_rank * ranks.world:
            raise ValueError(
                f"{cfg.data.store}: {len(self.unlabelled)} unlabelled images (the rest of train"
                + "".join(f", {s}" for s in data.image_only)
                + "), fewer than one step's unlabelled batch; lower --unlabeled-batch, label "
                "fewer images or add image-only splits (softprep build --unlabeled DIR)"
            )
        self.teacher = None
        if cfg.optim.ema:
            raise ValueError(
                "--ema with teacher-student: the teacher is the weight EMA already (--semi-ema)"
            )

    def start(self, model: torch.nn.Module) -> None:
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def batches(self, start: int, cleanup):
        """Labelled micro-batches with the unlabelled crops as ``unlabeled`` (B', 3, h, w)
        uint8, with their ``unlabeled_size`` and ``unlabeled_flipped`` (``valid_mask``)."""
        labelled = super().batches(start, cleanup)
        cfg, ranks = self.cfg, self.data.ranks
        loader = run_loader(
            self.unlabelled, self.per_rank, cfg.optim.seed + 1, start, ranks.rank, ranks.world,
            cfg.data.workers, ranks.device.type == "cuda",
        )  # fmt: skip
        unlabelled = cleanup.enter_context(batches(loader))
        for batch in labelled:
            crops = next(unlabelled)
            yield batch | {
                "unlabeled": crops["image"],
                "unlabeled_size": crops["size"],
                "unlabeled_flipped": crops["flipped"],
            }

    def loss(self, forward: Forward, batch: dict, step: int, micro: int) -> LossOutput:
        """One forward of the student over the labelled crops and the strong view of the
        unlabelled ones together (one pass, as DDP wants); the supervised loss plus the
        unsupervised loss against the teacher's weak view."""
        image, unlabeled, index = batch["image"], batch["unlabeled"], batch["index"]
        size = tuple(unlabeled.shape[-2:])
        valid = valid_mask(batch["unlabeled_size"], batch["unlabeled_flipped"], size)
        g = draws(self.cfg.optim.seed, STRONG_VIEW, self.data.ranks.rank, micro)
        with torch.no_grad():
            probs = upsample(forward(normalise(unlabeled), self.teacher), size).softmax(1)
        strong = strong_view(unlabeled, g, valid)
        if self.opts.cutmix and unlabeled.shape[0] > 1:
            box = cutmix_boxes(unlabeled.shape[0], size, g).to(unlabeled.device)[:, None]
            strong = torch.where(box, strong.roll(1, dims=0), strong)  # pasted from the previous
            probs = torch.where(box, probs.roll(1, dims=0), probs)
            valid = torch.where(box[:, 0], valid.roll(1, dims=0), valid)
        both = forward(torch.cat([image, normalise(strong).to(image.dtype)]))
        labelled_logits, strong_logits = both[: len(image)], both[len(image) :]
        unsupervised = self.unsupervised(upsample(strong_logits, size).log_softmax(1), probs,
                                         valid, step, g)  # fmt: skip
        logits = upsample(labelled_logits, index.shape[-2:])
        out = self.criterion(
            logits, index, batch["prob"], batch["colour"], step, image_pixels(batch)
        )
        return LossOutput(out.loss + unsupervised, out.kl, out.kept)

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """The EMA with momentum min(ema, 1 - 1 / (step + 1)), so the teacher does not keep
        the random initial weights (and BatchNorm statistics) for the first ~1 / (1 - ema)
        steps."""
        ema_follow(self.teacher, model, min(self.opts.ema, 1 - 1 / (step + 1)), self.data.ranks)

    def state(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def restore(self, ckpt: dict) -> None:
        if "teacher" in ckpt:
            self.teacher.load_state_dict(ckpt["teacher"])

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.teacher if self.opts.eval == "teacher" else model

    def unsupervised(self, logp, probs, valid, step: int, g) -> torch.Tensor:
        """Unsupervised loss of student log-probabilities ``logp`` against teacher ``probs``
        (both (B, C, H, W) float32) on the image pixels ``valid`` (B, H, W) bool: hard
        pseudo-labels, dynamic soft labels, inter-pixel."""
        conf, hard = probs.max(1)
        confident = (conf >= self.opts.threshold) & valid
        nll = F.nll_loss(logp, hard, reduction="none")
        loss = (nll * confident).sum() / valid.sum().clamp_min(1)
        unsure = valid & ~confident
        if self.opts.esl and unsure.any():
            tau = 0.5 + (self.opts.threshold - 0.5) * min(1.0, step / max(1, self.cfg.optim.iters))
            ce = -(dynamic_soft_labels(probs, tau) * logp).sum(1)
            loss = loss + self.opts.esl_weight * ce[unsure].mean()
        if self.opts.ipix != "none" and confident.sum() > 1:
            where = confident.flatten().nonzero()[:, 0]
            pick = where[
                torch.randperm(len(where), generator=g)[: self.opts.ipix_pixels].to(where.device)
            ]
            c = logp.shape[1]
            student = logp.exp().permute(0, 2, 3, 1).reshape(-1, c)[pick]
            teacher = probs.permute(0, 2, 3, 1).reshape(-1, c)[pick]
            loss = loss + self.opts.ipix_weight * relation_loss(student, teacher, self.opts.ipix)
        return loss
