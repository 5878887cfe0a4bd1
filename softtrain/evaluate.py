"""Inference and evaluation at full resolution, as mmsegmentation users know it.

- ``whole`` mode: the image at a stored level goes through the model in one piece; the
  logits are upsampled bilinearly to the full-resolution label.
- ``slide`` mode (mmseg's ``slide``): windows of ``window`` pixels every ``stride`` pixels
  over the level image (the last window flush with the border); each window's logits are
  upsampled to the window, overlaps averaged.
- Test-time augmentation: ``flip`` adds the horizontally flipped image; ``tta_levels`` adds
  other stored levels of the same image. Softmax probabilities are averaged at the main
  level's score size, then upsampled.
- Decodes (``softprep.decode``): per-class offsets ``b`` on log probabilities, fitted on
  one split for its mIoU (``fit_model_decode``), so thin classes below one half still win
  their pixels: labels are ``argmax(logits + b)`` of the upsampled logits (with TTA,
  ``argmax(exp(b) p)`` of the upsampled averaged probabilities).

The upsample + argmax runs over chunks of classes, so a 124-class 4000x6000 label never
needs all class scores at full resolution at once (the result is identical).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from softprep.decode import Decode, DecodeSample, fit_decode
from softprep.store import SoftStore, StoreError, parse_scale, scale_label
from softtrain import distributed
from softtrain.checkpoint import load_checkpoint
from softtrain.config import parse_crop
from softtrain.data import EvalDataset, normalise
from softtrain.distributed import Ranks
from softtrain.metrics import Confusion
from softtrain.models import build_model

MODES = ("whole", "slide")
CLASS_CHUNK = 32


@dataclass
class InferenceOptions:
    """How a whole image is segmented; ``window``/``stride`` as HEIGHTxWIDTH (slide mode;
    empty: the training crop and 2/3 of it); ``tta_levels``: more stored levels."""

    mode: str = "whole"
    window: str = ""
    stride: str = ""
    flip: bool = False
    tta_levels: tuple[str, ...] = ()
    bf16: bool = False
    decode: Decode | None = None  # None: the plain argmax

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}'; choose from {', '.join(MODES)}")

    @property
    def averaged(self) -> bool:
        """Whether ``segment_scores`` gives averaged probabilities (TTA), not logits."""
        return self.flip or bool(self.tta_levels)

    def windows(self, crop: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """(window, stride) in pixels of the level image, defaults from the training crop."""
        window = parse_crop(self.window or crop)
        stride = parse_crop(self.stride) if self.stride else None
        stride = stride or (max(1, window[0] * 2 // 3), max(1, window[1] * 2 // 3))
        return window, stride


def _forward(model, image: torch.Tensor, bf16: bool) -> torch.Tensor:
    """(1, 3, h, w) uint8 -> (1, C, h', w') float32 logits at the model's output stride."""
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(normalise(image)).float()


def _slide(model, image: torch.Tensor, window, stride, bf16: bool) -> torch.Tensor:
    """(1, 3, h, w) uint8 -> (1, C, h, w) logits averaged over sliding windows."""
    _, _, h, w = image.shape
    (wh, ww), (sh, sw) = window, stride
    scores, count = None, torch.zeros((1, 1, h, w), device=image.device)
    for gy in range(max(h - wh + sh - 1, 0) // sh + 1):
        for gx in range(max(w - ww + sw - 1, 0) // sw + 1):
            y2, x2 = min(gy * sh + wh, h), min(gx * sw + ww, w)
            y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
            logits = _forward(model, image[:, :, y1:y2, x1:x2], bf16)
            logits = F.interpolate(logits, (y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            if scores is None:
                scores = torch.zeros((1, logits.shape[1], h, w), device=image.device)
            scores[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return scores / count


def level_scores(model, image: torch.Tensor, opts: InferenceOptions, window, stride):
    """Class scores (1, C, h', w') of one level image in the chosen mode."""
    if opts.mode == "slide":
        return _slide(model, image, window, stride, opts.bf16)
    return _forward(model, image, opts.bf16)


def segment_scores(model, images: list[torch.Tensor], opts: InferenceOptions, window, stride):
    """Scores of one image given at one or more levels (main level first), with TTA:
    logits without augmentation, averaged softmax probabilities with it."""
    main = level_scores(model, images[0], opts, window, stride)
    if len(images) == 1 and not opts.flip:
        return main
    probs = torch.zeros_like(main)
    for image in images:
        for flip in (False, True) if opts.flip else (False,):
            x = image.flip(-1) if flip else image
            s = level_scores(model, x, opts, window, stride)
            s = s.flip(-1) if flip else s
            s = F.interpolate(s, main.shape[-2:], mode="bilinear", align_corners=False)
            probs += s.softmax(1)
    return probs / (len(images) * (2 if opts.flip else 1))


def decode_labels(scores: torch.Tensor, size: tuple[int, int], opts: InferenceOptions):
    """(1, C, h, w) ``segment_scores`` -> (H, W) int64 labels at ``size``: the argmax of
    their bilinear upsampling after ``opts.decode``'s per-class offsets."""
    if opts.decode is not None:
        bias = torch.tensor(opts.decode.bias, dtype=scores.dtype, device=scores.device)
        if len(bias) != scores.shape[1]:
            raise ValueError(
                f"the decode has {len(bias)} classes, the model {scores.shape[1]}: fitted for "
                "another dataset"
            )
        bias = bias.view(1, -1, 1, 1)
        scores = scores * bias.exp() if opts.averaged else scores + bias
    return upsample_argmax(scores, size)


def upsample_argmax(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, C, h, w) scores -> (H, W) int64 argmax of their bilinear upsampling to ``size``,
    computed over chunks of classes (identical to upsampling all at once)."""
    best_val, best_idx = None, None
    for c0 in range(0, scores.shape[1], CLASS_CHUNK):
        up = F.interpolate(
            scores[:, c0 : c0 + CLASS_CHUNK], size, mode="bilinear", align_corners=False
        )
        val, idx = up[0].max(0)
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + c0, best_idx)
    return best_idx


@torch.no_grad()
def evaluate(
    model,
    dataset: EvalDataset,
    num_classes: int,
    device,
    opts: InferenceOptions | None = None,
    crop: str = "512x1024",
    progress=None,
    ranks: Ranks | None = None,
    keep: list | None = None,
) -> Confusion:
    """Confusion matrix of ``model`` over ``dataset`` at full resolution. ``crop``: the
    training crop (default slide window); ``progress(done, total)`` after each image.
    ``ranks``: under torchrun each rank scores every ``world``-th image and the matrices
    are summed, so every rank gets the single-process result. ``keep``: a list that gets
    (colour (h, w, 3) uint8 at the level, truth (H, W), prediction (H, W) uint8 numpy) of
    this rank's first two images."""
    opts = opts or InferenceOptions()
    ranks = ranks or Ranks(device=torch.device(device))
    window, stride = opts.windows(crop)
    was_training = model.training
    model.eval()
    confusion = Confusion(num_classes, device)
    share = Subset(dataset, range(ranks.rank, len(dataset), ranks.world))
    loader = DataLoader(share, batch_size=1, num_workers=0, generator=torch.Generator())
    for n, batch in enumerate(loader):
        images = [x.to(device) for x in batch["images"]]
        label = batch["label"][0].to(device)
        scores = segment_scores(model, images, opts, window, stride)
        pred = decode_labels(scores, tuple(label.shape), opts)
        confusion.update(pred, label)
        if keep is not None and n < 2:
            colour = images[0][0].permute(1, 2, 0).cpu().numpy()
            keep.append((colour, label.cpu().numpy(), pred.cpu().numpy().astype("uint8")))
        if progress:
            progress(n + 1, len(share))
    distributed.sum_(ranks, confusion.matrix)
    model.train(was_training)
    return confusion


@torch.no_grad()
def fit_model_decode(
    model,
    dataset: EvalDataset,
    num_classes: int,
    device,
    kind: str,
    split: str,
    opts: InferenceOptions | None = None,
    crop: str = "512x1024",
    progress=None,
    every: int = 4,
    max_pixels: int | None = 20_000,
) -> Decode:
    """A decode of ``kind`` (``softprep.decode.KINDS``) fitted for the mIoU of ``model`` on
    ``dataset`` (the fit split, named ``split``): the upsampled class probabilities at
    every ``every``-th pixel of each row and column (offsets varying per image; sampled
    with ``grid_sample``, exactly the values of the full bilinear upsampling), at most
    ``max_pixels`` per image kept (``DecodeSample``; None: all, the fit is then exact)."""
    opts = opts or InferenceOptions()
    window, stride = opts.windows(crop)
    was_training = model.training
    model.eval()
    sample = DecodeSample(num_classes, max_pixels=max_pixels, seed=0)
    loader = DataLoader(dataset, batch_size=1, num_workers=0)
    for n, batch in enumerate(loader):
        images = [x.to(device) for x in batch["images"]]
        label = batch["label"][0]
        scores = segment_scores(model, images, opts, window, stride).float()
        h, w = label.shape
        ys = torch.arange(n % every, h, every)
        xs = torch.arange((n // every) % every, w, every)
        grid = torch.stack(  # normalised pixel centres, as F.interpolate samples them
            torch.meshgrid((2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1, indexing="xy"), -1
        )
        up = F.grid_sample(
            scores, grid[None].to(scores.device), mode="bilinear", padding_mode="border",
            align_corners=False,
        )[0]  # fmt: skip
        probs = up if opts.averaged else up.softmax(0)
        sample.add(probs.cpu().numpy(), label[ys][:, xs].numpy().astype(np.uint8))
        if progress:
            progress(n + 1, len(dataset))
    model.train(was_training)
    return fit_decode(sample, kind, fitted_on=split)


def model_from_checkpoint(ckpt: dict, device) -> torch.nn.Module:
    """The checkpoint's model, weights loaded, in eval mode on ``device``: the one its run
    evaluated (and chose ``best.pt`` by): the teacher of a semi-supervised run unless it
    was set to evaluate the student, the weight EMA of a run with ``--ema``, else the model."""
    model = build_model(ckpt["config"]["model"], len(ckpt["classes"]))
    use_teacher = "teacher" in ckpt and ckpt["config"].get("semi_eval", "teacher") == "teacher"
    weights = ckpt["teacher"] if use_teacher else ckpt.get("ema", ckpt["model"])
    model.load_state_dict(weights)
    return model.to(device).eval()


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU if PyTorch sees one, else the CPU. A device that does not exist
    here is refused (``ValueError``, one sentence) before anything is written."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"device {name!r}: not a device name; use cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {name!r}: PyTorch sees no CUDA GPU on this machine "
                f"(torch {torch.__version__}); use cpu or auto"
            )
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: softtrain runs on cpu or cuda")
    return device


def eval_dataset(
    url: str, level: str, split: str, tta_levels=(), purpose: str = "score"
) -> EvalDataset:
    """An evaluation dataset, refused with a clear message for a split without labels
    (``purpose``: what the split was wanted for, said in that message)."""
    store = SoftStore(url)
    evaluable = store.meta.get("eval_splits", [])
    if split not in store.splits:
        raise StoreError(f"{url}: no split '{split}'; splits: {', '.join(store.splits)}")
    if split not in evaluable:
        raise StoreError(
            f"{url}: split '{split}' has no full-resolution labels (only the evaluation "
            f"splits keep them: {', '.join(evaluable) or 'none'}); nothing to {purpose}"
        )
    levels = [scale_label(parse_scale(level))] + [scale_label(parse_scale(t)) for t in tta_levels]
    return EvalDataset(url, levels, split)


def eval_checkpoint(
    checkpoint: str,
    store_url: str,
    level: str | None = None,
    split: str = "val",
    device: str = "auto",
    opts: InferenceOptions | None = None,
    progress=None,
    fit_kind: str | None = None,
    fit_split: str = "val",
) -> tuple[Confusion, dict]:
    """Evaluate a checkpoint on a store split at full resolution. ``fit_kind``: first fit a
    decode of that kind on ``fit_split`` and score with it (else ``opts.decode``). Returns
    the confusion matrix and the record's context (checkpoint, step, split, level, mode,
    decode)."""
    store = SoftStore(store_url)
    ckpt = load_checkpoint(checkpoint, store.classes)
    opts = opts or InferenceOptions()
    level = level or ckpt["eval_level"]
    dataset = eval_dataset(store_url, level, split, opts.tta_levels)
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt, dev)
    crop, c = ckpt["config"]["crop"], len(store.classes)
    if fit_kind is not None:
        fitset = eval_dataset(
            store_url, level, fit_split, opts.tta_levels, "fit the decode on (--fit-split)"
        )
        decode = fit_model_decode(model, fitset, c, dev, fit_kind, fit_split, opts, crop)
        opts = replace(opts, decode=decode)
    confusion = evaluate(model, dataset, c, dev, opts, crop, progress)
    context = {
        "checkpoint": str(checkpoint),
        "step": ckpt["step"],
        "split": split,
        "level": level,
        "mode": opts.mode,
        "flip": opts.flip,
        "tta_levels": list(opts.tta_levels),
        "decode": opts.decode.to_dict() if opts.decode else None,
    }
    return confusion, context
