"""A trained model as one object: ``Segmenter.from_checkpoint(path)`` then
``segmenter(image) -> labels``, the way ``softtrain predict`` labels files.

An image is resized as the store was (its colour kernel, antialias, the checkpoint's
evaluation level and any ``tta_levels``), normalised, segmented (``InferenceOptions``:
whole or slide, flip), and its scores are upsampled bilinearly to the image's own size and
decoded (argmax, or a fitted ``softprep.decode.Decode``).

``exported(...)`` wraps the model for TorchScript / ONNX: uint8 RGB in, labels out, the
resize (torch's antialiased bilinear, a few rounding differences from PIL), normalisation,
upsampling and decode inside.
"""

from __future__ import annotations

import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from softprep.datasets import open_image
from softprep.manifest import Manifest, manifest_from_json
from softprep.options import level_size
from softprep.resample import Resampler
from softprep.store import parse_scale
from softtrain.checkpoint import load_checkpoint
from softtrain.data import MEAN, STD
from softtrain.evaluate import (
    InferenceOptions,
    decode_labels,
    model_from_checkpoint,
    resolve_device,
    segment_scores,
)


class Segmenter:
    """Labels images with a checkpoint's model. ``segmenter(image)``: (H, W) uint8 train
    ids of a PIL image, an (H, W, 3) uint8 array or an image file; ``scores(image)``: the
    (1, C, h, w) scores before upsampling (logits; averaged probabilities with TTA)."""

    def __init__(self, ckpt: dict, device: str = "auto", opts: InferenceOptions | None = None):
        self.device = resolve_device(device)
        self.opts = opts or InferenceOptions()
        self.model = model_from_checkpoint(ckpt, self.device)
        self.meta, self.eval_level = ckpt["store_meta"], ckpt["eval_level"]
        self.scales = [parse_scale(s) for s in (self.eval_level, *self.opts.tta_levels)]
        self.window, self.stride = self.opts.windows(ckpt["config"]["crop"])
        self.manifest: Manifest = manifest_from_json(self.meta["manifest"], "checkpoint manifest")

    @classmethod
    def from_checkpoint(cls, path: str | Path, device="auto", opts=None) -> Segmenter:
        return cls(load_checkpoint(path), device, opts)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def levels(self, image: Image.Image) -> list[torch.Tensor]:
        """The image at each inference level: (1, 3, h, w) uint8 on the device."""
        hw = (image.height, image.width)
        kernel = self.meta.get("colour_kernel") or self.meta["kernel"]
        out = []
        for scale in self.scales:
            size = level_size(hw, scale, self.meta["short_side"])
            small = Resampler.make(hw, size, kernel, self.meta["antialias"]).colour(image)
            out.append(torch.from_numpy(small.transpose(2, 0, 1).copy())[None].to(self.device))
        return out

    @torch.no_grad()
    def scores(self, image) -> torch.Tensor:
        return segment_scores(
            self.model, self.levels(_as_image(image)), self.opts, self.window, self.stride
        )

    @torch.no_grad()
    def __call__(self, image) -> np.ndarray:
        image = _as_image(image)
        scores = self.scores(image)
        labels = decode_labels(scores, (image.height, image.width), self.opts)
        return labels.cpu().numpy().astype(np.uint8)


def _as_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"an image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
            )
        return Image.fromarray(image, "RGB")
    return open_image(Path(image))


class Exported(torch.nn.Module):
    """uint8 RGB (B, 3, H, W) -> uint8 train ids (B, H, W): resize to the level (antialiased
    bilinear) at the size the store and ``predict`` use (``level_size``: round half up, of
    the image or, with ``short_side``, of the image scaled to that short side), normalise,
    model, upsample, per-class decode offsets, argmax."""

    def __init__(self, segmenter: Segmenter, scale: float):
        super().__init__()
        self.model = segmenter.model.eval()
        f = Fraction(scale).limit_denominator(1 << 16)
        self.num, self.den = f.numerator, f.denominator
        self.short_side = segmenter.meta.get("short_side")
        bias = (
            segmenter.opts.decode.bias if segmenter.opts.decode else (0.0,) * segmenter.num_classes
        )
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("mean", MEAN.view(1, 3, 1, 1).clone())
        self.register_buffer("std", STD.view(1, 3, 1, 1).clone())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # max(1, floor(n * scale * ref / m + 0.5)) in integer arithmetic, which tracing and
        # torch.export keep symbolic (min(h, w) as (h + w - |h - w|) // 2, max(1, v) as
        # v + 1 // (v + 1)); a scale_factor gave floor(n * scale) rows, off by one from
        # predict's level
        h, w = image.shape[-2:]
        ref, m = (self.short_side, (h + w - abs(h - w)) // 2) if self.short_side else (1, 1)
        size = [(2 * n * self.num * ref + self.den * m) // (2 * self.den * m) for n in (h, w)]
        size = [v + 1 // (v + 1) for v in size]
        x = F.interpolate(
            image.float(), size=size, mode="bilinear", align_corners=False, antialias=True
        )
        logits = self.model((x.round().clamp(0, 255) - self.mean) / self.std)
        up = F.interpolate(
            logits.float(), size=image.shape[-2:], mode="bilinear", align_corners=False
        )
        return (up + self.bias).argmax(1).to(torch.uint8)


class InputChecked(torch.nn.Module):
    """The TorchScript export's outer module, scripted around the traced ``Exported``
    (tracing drops Python's checks): an input that is not uint8 (B, 3, H, W) is refused
    with what the model takes, where a float image in 0..1 or a channels-last one gave
    wrong labels without a word. (ONNX Runtime checks the dtype and channels itself.)"""

    def __init__(self, traced: torch.nn.Module):
        super().__init__()
        self.traced = traced

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        takes = "this model takes uint8 RGB images (B, 3, H, W) with values 0..255"
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"{takes}, not shape {list(image.shape)}")
        if image.is_floating_point():
            raise ValueError(
                f"{takes}, not floats: x.round().to(torch.uint8), or from 0..1 "
                "(x * 255).round().to(torch.uint8)"
            )
        if image.dtype != torch.uint8:
            raise ValueError(f"{takes}; this one is of another integer type: x.to(torch.uint8)")
        return self.traced(image)


FORMATS = ("torchscript", "onnx")


def check_export_target(out: Path, fmt: str) -> None:
    """Refuse, before any work, an export format we do not write or an ``out`` that is a
    folder (the CLI also refuses an input as ``out``: ``output_files``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; choose {' or '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'model.pt'}")


def export(segmenter: Segmenter, out: Path, fmt: str, example_hw: tuple[int, int]) -> Path:
    """Write the segmenter as ``torchscript`` (traced) or ``onnx`` (``torch.onnx.export``'s
    dynamo exporter, which handles the antialiased resize) for (B, 3, H, W) uint8 images of
    any B, H and W; it is traced with two zero images of ``example_hw`` = (H, W)."""
    check_export_target(out, fmt)
    module = Exported(segmenter, parse_scale(segmenter.eval_level)).to("cpu").eval()
    example = torch.zeros(2, 3, *example_hw, dtype=torch.uint8)  # 2: the batch stays free
    out = Path(out)
    if fmt == "torchscript":
        # PyTorch deprecates TorchScript for its own future, not for the runtimes that load
        # it (libtorch, Triton): its FutureWarning says nothing to a user of the export
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*torch\.jit\.\w+` is deprecated", FutureWarning)
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.script(InputChecked(traced).eval()).save(str(out))  # eval: freezable
    else:  # weights inside the one file (no model.onnx.data beside it): models here < 2 GB;
        # batch, height and width symbolic, as the traced TorchScript's are
        Dim = torch.export.Dim
        torch.onnx.export(
            module, (example,), str(out), input_names=["image"], output_names=["labels"],
            dynamo=True, external_data=False, verbose=False,
            dynamic_shapes=({0: Dim("batch"), 2: Dim("height"), 3: Dim("width")},),
        )  # fmt: skip
    return out
