"""The suite's model for tests whose subject is the loop (resume, DDP, regimes, runs, export
wrappers), not an architecture: two strided conv-BatchNorm-ReLU blocks and a 1x1 classifier,
5.8 k parameters at 19 classes, logits at stride 4 (softtrain resizes them to the crop). A
factory, as a user's would be: ``--model tests.tinynet:tinynet``. deeplabv3plus_r18 (16.6 M
parameters) took ~4x as long per step and wrote ~130 MB checkpoints (weights and momentum);
the tests of the architectures themselves (their ONNX export included) keep the real models."""

from torch import nn

TINY = f"{__name__}:tinynet"


def tinynet(num_classes: int) -> nn.Module:
    """(B, 3, H, W) float -> (B, num_classes, ceil(H / 4), ceil(W / 4)) logits."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]  # fmt: skip

    return nn.Sequential(*block(3, 16), *block(16, 32), nn.Conv2d(32, num_classes, 1))
