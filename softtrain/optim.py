"""The optimiser of a run: SGD or AdamW with the usual parameter groups, the poly schedule,
and fp16's gradient scaler, stepped together.

Parameter groups: the trunk (``model.trunk``, or a factory model's ``backbone``) at ``--lr``
and everything else (the head) at ``--head-lr`` x ``--lr``; with ``--no-norm-decay`` the
normalisation weights and all biases (tensors of one dimension) get no weight decay. With
the defaults (``--head-lr 1``, norm decay on) every parameter is in one group, as before.
"""

from __future__ import annotations

import torch

from softtrain.config import FitConfig


def poly_lr(step: int, cfg: FitConfig) -> float:
    """Learning-rate factor at ``step``: linear warm-up, then (1 - t)^power."""
    optim = cfg.optim
    if step < optim.warmup_iters:
        return (step + 1) / optim.warmup_iters
    return max(0.0, 1 - step / max(1, optim.iters)) ** optim.power


def param_groups(model: torch.nn.Module, cfg: FitConfig) -> list[dict]:
    """Groups with ``lr_mult`` (of ``--lr``) and ``weight_decay``; empty groups dropped."""
    optim = cfg.optim
    if optim.head_lr == 1 and optim.norm_decay:
        return [{"params": list(model.parameters()), "lr_mult": 1.0}]
    trunk = getattr(model, "trunk", None) or getattr(getattr(model, "net", None), "backbone", None)
    in_trunk = {id(p) for p in trunk.parameters()} if trunk is not None else set()
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        decays = optim.norm_decay or p.ndim > 1
        groups.setdefault((id(p) in in_trunk, decays), []).append(p)
    return [
        {"params": params, "lr_mult": 1.0 if is_trunk else optim.head_lr,
         "weight_decay": optim.weight_decay if decays else 0.0}
        for (is_trunk, decays), params in sorted(groups.items(), reverse=True)
    ]  # fmt: skip


class Stepper:
    """Optimiser, schedule and gradient scaler. ``backward(loss)`` per micro-batch,
    ``step()`` per optimiser step; ``state()``/``restore()`` for checkpoints (keys
    ``optimizer``, ``scheduler`` and, with fp16, ``scaler``)."""

    def __init__(self, model: torch.nn.Module, cfg: FitConfig, device: torch.device):
        optim, self.cfg = cfg.optim, cfg
        groups = param_groups(model, cfg)
        for g in groups:
            g["lr"] = optim.lr * g["lr_mult"]
        if optim.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(
                groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: poly_lr(s, cfg)
        )
        self.scaler = torch.amp.GradScaler(device.type) if cfg.speed.fp16 else None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        """The trunk's learning rate now."""
        return self.scheduler.get_last_lr()[0]

    def state(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return state | ({"scaler": self.scaler.state_dict()} if self.scaler else {})

    def restore(self, ckpt: dict, step: int) -> None:
        """A resumed checkpoint's state at ``step``; this run's ``--lr`` and ``--iters``
        apply (each group keeps its multiplier)."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        lr = self.cfg.optim.lr
        groups = self.optimizer.param_groups
        self.scheduler.base_lrs = [lr * g.get("lr_mult", 1.0) for g in groups]
        for g, base in zip(groups, self.scheduler.base_lrs):
            g["initial_lr"], g["lr"] = base, base * poly_lr(step, self.cfg)
