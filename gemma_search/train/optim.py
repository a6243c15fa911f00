"""Optimizers and learning-rate schedules, built from flat arguments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(params: Iterable[Any], *, name: str, lr: float, weight_decay: float,
                    momentum: float | None, adam_beta2: float | None) -> Any:
    """One of the six optimizers of the search space.

    AdamW and AdaBelief decay weights decoupled from the gradient; Adam, SGD, Adagrad and
    RMSprop add `weight_decay * w` to the gradient (classic L2).
    """
    import torch

    params = [p for p in params if p.requires_grad]
    betas = (0.9, adam_beta2 if adam_beta2 is not None else 0.999)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum or 0.0,
                               weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum or 0.0,
                                   weight_decay=weight_decay)
    if name == "adabelief":
        from pytorch_optimizer import AdaBelief

        return AdaBelief(params, lr=lr, betas=betas, weight_decay=weight_decay,
                         weight_decouple=True)
    raise ValueError(f"unknown optimizer {name!r}")  # the spec validated it: a bug


def build_scheduler(optimizer: Any, *, schedule: str, warmup_steps: int, total_steps: int) -> Any:
    """cosine / linear decay to 0 over `total_steps`, or constant; all with linear warmup."""
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    return get_scheduler(names[schedule], optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps)
