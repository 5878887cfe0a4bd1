"""Segmentation models: timm trunks with our own heads, built by name from one registry.

- ``hrnetv2_w18`` / ``hrnetv2_w32`` / ``hrnetv2_w48``: HRNetV2 (timm ``hrnet_w*`` raw
  branches at strides 4-32, upsampled to stride 4, concatenated, 1x1 conv-BN-ReLU, 1x1 conv)
- ``deeplabv3plus_r50`` / ``deeplabv3plus_r101``: DeepLabV3+ (ResNet, output stride 16,
  ASPP rates 6/12/18 + image pooling, decoder with 48-channel stride-4 features)
- ``deeplabv3plus_r18``: the same on ResNet-18, small enough for CPU tests

Outputs are logits at stride 4; callers upsample bilinearly. Pretrained trunk weights come
only from a local file (``pretrained=PATH``, ``load_trunk_weights``): a timm, torchvision or
mmseg/mmcv checkpoint of the trunk's ImageNet model (``resnet18/50/101``, ``hrnet_w18/32/48``);
nothing is ever downloaded. timm is imported when a model is built.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from softtrain import config


def conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


log = logging.getLogger("softtrain")
PREFIXES = ("", "module.", "backbone.", "model.", "encoder.", "trunk.", "module.backbone.")
WRAPPERS = ("state_dict", "model", "model_state", "module", "net")
MIN_MATCHED = 0.9  # share of the trunk's tensors a weights file must provide


def _trunk(name: str, pretrained: str | None, **kwargs) -> nn.Module:
    import timm

    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"{pretrained}: pretrained weights file not found")
    trunk = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    if pretrained:
        log.warning(load_trunk_weights(trunk, pretrained, name))  # shown as a note
    return trunk


def load_trunk_weights(trunk: nn.Module, path: str | Path, name: str = "the trunk") -> str:
    """Load ImageNet weights into ``trunk`` from a timm, torchvision or mmseg/mmcv file:
    a state dict, possibly wrapped (``state_dict``, ``model``, ...) and prefixed
    (``backbone.``, ``module.``, ...); tensors match by name and shape. Refuses
    (``ValueError``, one sentence) a file PyTorch cannot read as plain tensors, a softtrain
    checkpoint, or one that gives fewer than ``MIN_MATCHED`` of the trunk's tensors (no
    silent random start). Returns what was loaded, as one line."""
    import pickle
    import zipfile

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            first = "it holds Python objects beyond tensors, as a softtrain checkpoint does"
        raise ValueError(
            f"{path}: not a weights file for --pretrained ({first}); give the trunk's "
            f"ImageNet state dict ({name}: a timm, torchvision or mmseg checkpoint)"
        ) from None
    except Exception as e:  # struct.error, UnicodeDecodeError ...: junk bytes
        raise ValueError(
            f"{path}: not a weights file PyTorch can read ({type(e).__name__})"
        ) from None
    if isinstance(raw, dict) and "classes" in raw and "config" in raw:
        raise ValueError(
            f"{path}: a softtrain checkpoint, not trunk weights; continue that run with "
            "--resume, or give the trunk's ImageNet weights"
        )
    weights = raw
    for _ in range(3):  # wrappers nest a few deep at most
        inner = [
            weights[k]
            for k in WRAPPERS
            if isinstance(weights, dict) and isinstance(weights.get(k), dict)
        ]
        if not inner:
            break
        weights = inner[0]
    if not isinstance(weights, dict) or not any(torch.is_tensor(v) for v in weights.values()):
        raise ValueError(f"{path}: holds no tensors by name (not a state dict)")
    own = trunk.state_dict()

    def matching(prefix: str) -> dict:
        return {
            k[len(prefix) :]: v
            for k, v in weights.items()
            if k.startswith(prefix)
            and torch.is_tensor(v)
            and k[len(prefix) :] in own
            and own[k[len(prefix) :]].shape == v.shape
        }

    prefix = max(PREFIXES, key=lambda p: len(matching(p)))
    found = matching(prefix)
    if len(found) < MIN_MATCHED * len(own):
        raise ValueError(
            f"{path}: only {len(found)} of the {len(own)} tensors of {name} match by name and "
            f"shape{f' (prefix {prefix!r} removed)' if prefix else ''}; is it {name}'s "
            "ImageNet checkpoint?"
        )
    trunk.load_state_dict(found, strict=False)
    unused = len(weights) - len(found)
    return (
        f"{path}: loaded {len(found)} of {len(own)} trunk tensors of {name}"
        + (f" (prefix {prefix!r} removed)" if prefix else "")
        + (f"; {unused} entries of the file unused (e.g. the classifier)" if unused else "")
    )


class HRNetV2(nn.Module):
    """HRNetV2 segmentation: all four branches fused at stride 4. Any input size: one that
    is not a multiple of 32 (CamVid at 1/8 is 45x60) is zero-padded (the mean colour, once
    normalised) at its bottom and right to the next multiple, which timm's fusion layers
    need, and the logits are cropped back to ceil(H / 4) x ceil(W / 4)."""

    STRIDE = 32

    def __init__(self, trunk: str, num_classes: int, pretrained: str | None = None):
        super().__init__()
        self.trunk = _trunk(trunk, pretrained, feature_location="", out_indices=(1, 2, 3, 4))
        channels = sum(self.trunk.feature_info.channels())
        self.head = nn.Sequential(
            conv_bn_relu(channels, channels), nn.Conv2d(channels, num_classes, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = self.STRIDE
        x = F.pad(x, (0, (s - w % s) % s, 0, (s - h % s) % s))
        feats = self.trunk(x)
        size = feats[0].shape[-2:]
        up = [feats[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]
        ]
        # ceil(h / 4) as (h + 3) // 4, not -(-h // 4): an ONNX export with symbolic sizes
        # truncates the floor division of a negative number (11 rows, not 12, at 45x60)
        return self.head(torch.cat(up, dim=1))[..., : (h + 3) // 4, : (w + 3) // 4]


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int = 256, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, cout)] + [conv_bn_relu(cin, cout, 3, r) for r in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, cout))
        self.project = nn.Sequential(conv_bn_relu(cout * (len(rates) + 2), cout), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(
            self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+: ASPP on stride-16 features, decoder with stride-4 features."""

    def __init__(self, trunk: str, num_classes: int, pretrained: str | None = None):
        super().__init__()
        self.trunk = _trunk(trunk, pretrained, out_indices=(1, 4), output_stride=16)
        low, high = self.trunk.feature_info.channels()
        self.aspp = ASPP(high)
        self.low = conv_bn_relu(low, 48)
        self.decoder = nn.Sequential(
            conv_bn_relu(256 + 48, 256, 3),
            conv_bn_relu(256, 256, 3),
            nn.Conv2d(256, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.trunk(x)
        up = F.interpolate(
            self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.decoder(torch.cat([up, self.low(low)], dim=1))


# the heads softtrain.config.MODELS names (the registry, checked there before torch loads)
HEADS = {cls.__name__: cls for cls in (HRNetV2, DeepLabV3Plus)}


class FactoryModel(nn.Module):
    """A model from a user's factory, its output made plain logits: a tensor as it is, the
    ``"out"`` entry of a dict (torchvision's segmentation models), the first of a tuple."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, dict):
            out = out["out"]
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out


def from_factory(spec: str, num_classes: int) -> nn.Module:
    """``package.module:function``, called with ``num_classes``; it returns an
    ``nn.Module`` whose output (B, num_classes, h, w) logits are at any stride."""
    from importlib import import_module

    module, _, function = spec.partition(":")
    try:
        factory = getattr(import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--model {spec}: cannot import it ({e})") from None
    net = factory(num_classes)
    if not isinstance(net, nn.Module):
        raise ValueError(f"--model {spec}: returned {type(net).__name__}, not an nn.Module")
    return FactoryModel(net)


def build_model(name: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    """A model from the registry, or from a factory ``package.module:function`` (called
    with ``num_classes``); ``pretrained``: path of a local weights file for the trunk (for a
    factory's model: its ``backbone``, else the whole model)."""
    if ":" in name:
        model = from_factory(name, num_classes)
        if pretrained:
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"{pretrained}: pretrained weights file not found")
            target = getattr(model.net, "backbone", model.net)
            log.warning(load_trunk_weights(target, pretrained, f"{name}'s backbone"))
        return model
    config.check_model(name)
    head, trunk = config.MODELS[name]
    cls = HEADS[head]
    return cls(trunk, num_classes, pretrained)
