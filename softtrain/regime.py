"""Training methods behind ``fit``'s one loop.

A regime turns a micro-batch into a loss. ``fit`` builds it with the run's data before
anything is written (so bad input is refused first), hands it the model with ``start``,
then per micro-batch asks ``loss``, after every optimiser step calls ``after_step``,
saves ``state()`` with every checkpoint, gives a resumed checkpoint to ``restore`` and
evaluates ``eval_model``. What a regime needs (a teacher, its own loader, pseudo-labels)
lives in its module, its options in its ``FitConfig`` section.

Regimes are registered by name in ``softtrain.config.REGIMES`` ("module:class") and chosen
by ``--regime`` (``auto``: teacher-student when ``--labeled`` is given, else supervised).
A new method is one module with a ``Regime`` subclass plus one line there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import import_module

import torch

from softprep.store import SoftStore
from softtrain.config import REGIMES, FitConfig
from softtrain.data import CropDataset
from softtrain.distributed import Ranks, share_buffers
from softtrain.loader import batches, run_loader
from softtrain.losses import LossOutput

# forward(images (B, 3, h, w) float32 normalised, module=None) -> logits (B, C, h', w'):
# the training model (or ``module``) under the run's autocast
Forward = Callable[..., torch.Tensor]


@dataclass
class RunData:
    """What a regime trains on: the store, its ``train`` crops (with the image-only splits
    when the regime is teacher-student) and the processes it runs in."""

    store: SoftStore
    train: CropDataset
    image_only: list[str]  # image-only splits included in ``train``
    ranks: Ranks


class Regime:
    """The supervised defaults; subclasses override what their method changes. With
    ``--ema m`` a weight EMA of the model is kept, evaluated and saved (key ``ema``)."""

    def __init__(self, cfg: FitConfig, data: RunData):
        self.cfg, self.data = cfg, data
        self.labelled = data.train
        self.ema = None

    def start(self, model: torch.nn.Module) -> None:
        """The model is built, on its device, restored if resuming: make what depends on it."""
        if self.cfg.optim.ema:
            self.ema = copy.deepcopy(model).eval().requires_grad_(False)

    def batches(self, start: int, cleanup: ExitStack) -> Iterator[dict]:
        """Endless micro-batches from micro-batch ``start`` (per rank): ``image`` (B, 3, h, w)
        uint8, ``index``/``prob`` (B, K, h, w) uint8; loader workers end with ``cleanup``."""
        cfg, ranks = self.cfg, self.data.ranks
        loader = run_loader(
            self.labelled, cfg.optim.batch_size, cfg.optim.seed, start, ranks.rank, ranks.world,
            cfg.data.workers, ranks.device.type == "cuda",
        )  # fmt: skip
        return cleanup.enter_context(batches(loader))

    def loss(self, forward: Forward, batch: dict, step: int, micro: int) -> LossOutput:
        """The loss of one micro-batch (tensors on the device, ``image`` normalised)."""
        raise NotImplementedError

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """After optimiser step ``step`` (0-based): the EMA follows, with momentum warmed up
        as min(m, 1 - 1 / (step + 1))."""
        if self.ema is not None:
            ema_follow(
                self.ema, model, min(self.cfg.optim.ema, 1 - 1 / (step + 1)), self.data.ranks
            )

    def state(self) -> dict:
        """Saved in every checkpoint, next to the model (top-level keys)."""
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def restore(self, ckpt: dict) -> None:
        """What ``state`` saved, from a resumed checkpoint."""
        if self.ema is not None and "ema" in ckpt:
            self.ema.load_state_dict(ckpt["ema"])

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model evaluated and saved as the run's result."""
        return self.ema if self.ema is not None else model


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """t = m t + (1 - m) s for every parameter and floating buffer; other buffers copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.is_floating_point():
            t.mul_(momentum).add_(s, alpha=1 - momentum)
        else:
            t.copy_(s)


def ema_follow(teacher, student, momentum: float, ranks: Ranks) -> None:
    """``ema_update``, then rank 0's teacher buffers on every rank: under DDP each rank's
    student keeps BatchNorm statistics of its own crops, and checkpoints (and so a resume)
    hold rank 0's teacher alone."""
    ema_update(teacher, student, momentum)
    share_buffers(ranks, teacher)


def make_regime(cfg: FitConfig, data: RunData) -> Regime:
    """The registered regime ``cfg.regime``, built on ``data``."""
    module, name = REGIMES[cfg.regime].split(":")
    return getattr(import_module(module), name)(cfg, data)
