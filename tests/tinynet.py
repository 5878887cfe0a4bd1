"""The suite's model for tests whose subject is the loop (resume, DDP, regimes, runs, export
wrappers), not an architecture: two strided conv-BatchNorm-ReLU blocks, dropout and a 1x1
classifier, 5.8 k parameters at 19 classes, logits at stride 4 (softtrain resizes them to the
crop). The dropout draws from torch's global RNG, as DeepLabV3+'s does: without it a resume
that failed to restore the RNG would still end with the same weights. A factory, as a user's
would be: ``--model tests.tinynet:tinynet``. deeplabv3plus_r18 (16.6 M parameters) took ~4x
as long per step and wrote ~130 MB checkpoints (weights and momentum); the tests of the
architectures themselves (their TorchScript and ONNX export included) keep the real models."""

import os
from pathlib import Path

from torch import nn

REPO = Path(__file__).resolve().parents[1]  # not conftest's: a child would import pytest

TINY = f"{__name__}:tinynet"


def tinynet(num_classes: int) -> nn.Module:
    """(B, 3, H, W) float -> (B, num_classes, ceil(H / 4), ceil(W / 4)) logits."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]  # fmt: skip

    return nn.Sequential(
        *block(3, 16), *block(16, 32), nn.Dropout(0.1), nn.Conv2d(32, num_classes, 1)
    )


def child_env() -> dict[str, str]:
    """The environment of a child process (``softtrain fit``, torchrun) that must import
    ``tests.tinynet``: the repository on ``PYTHONPATH``, whatever the install and the folder."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return os.environ | {"PYTHONPATH": path}
