"""Optimiser and learning-rate schedule from ``train.*``, shared by every detector family.

``train.optimizer``: Adam (the tutorial's) or SGD with ``train.momentum`` (the papers'), both
with ``train.weight_decay``. The schedule is applied per step: a linear warm-up over
``train.warmup_epochs`` epochs from a tenth of ``train.lr``, then ``constant``, ``step`` (x0.1
after two thirds of ``train.epochs``, as Fast R-CNN's 30k/40k iterations) or ``cosine`` (to zero
at ``train.epochs``). Early stopping may end training before the schedule does.

Validation follows the schedule too: the first ``train.val_start`` of the epochs train without being
scored (with a decaying rate the best epoch comes late, and on a set like bccd scoring validation AP
costs as much as an epoch's training); patience counts from the first scored epoch. Validation draws
no random numbers, so the epochs trained are the same whichever are scored.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from rcnn.pipeline.params import TrainParams

WARMUP_START = 0.1  # warm-up starts at this fraction of train.lr
STEP_AT = 2 / 3  # the step schedule divides the rate by 10 after this fraction of train.epochs
STEP_FACTOR = 0.1


def build_optimizer(parameters: Iterable[torch.nn.Parameter], t: TrainParams,
                    backbone: Iterable[torch.nn.Parameter] = (), backbone_lr: float = 1.0) -> torch.optim.Optimizer:
    """Adam or SGD over ``parameters`` (only those that require gradients); those also in ``backbone`` (the
    pre-trained ones) learn at ``backbone_lr`` times ``train.lr`` (:func:`backbone_rate`)."""
    pretrained = {id(p) for p in backbone} if backbone_lr != 1.0 else set()
    trainable = [p for p in parameters if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in pretrained], "lr": t.lr},
              {"params": [p for p in trainable if id(p) in pretrained], "lr": t.lr * backbone_lr}]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)


def backbone_rate(t: TrainParams, rarest_class_objects: int) -> float:
    """The pre-trained backbone's rate as a multiple of ``train.lr``: ``train.backbone_lr``, or with
    ``train.backbone_lr_objects`` = N, derived from the data: ``min(1, max(backbone_lr, n / N))`` for the rarest
    class's n training objects. A few boxes a class pull ImageNet's features away faster than the new head learns
    (neu-few, 15 boxes: 0.1 is best); with hundreds a class the backbone should adapt at the full rate (bccd's
    Faster R-CNN lost 5 points of AP07 at 0.1)."""
    if not t.backbone_lr_objects:
        return t.backbone_lr
    return min(1.0, max(t.backbone_lr, rarest_class_objects / t.backbone_lr_objects))


def step_floor(t: TrainParams, rarest_class_objects: int) -> int:
    """The fewest optimiser steps training makes: ``train.min_steps``, raised to ``train.min_steps_rare`` where the
    rarest class has fewer than ``train.rare_class_objects`` training objects. A head and an RPN learning a class
    from a handful of boxes need more steps than the images alone make (neu-few, 15 boxes: Faster R-CNN val AP07
    0.32 -> 0.40 from 960 to 1,440 steps, 0.42 -> 0.55 from 1,440 to 2,880 on one seed), where a class with a
    hundred boxes does not (kangaroo's 128: noise) and would only pay the time."""
    if rarest_class_objects < t.rare_class_objects:
        return max(t.min_steps, t.min_steps_rare)
    return t.min_steps


def lr_factor(step: int, steps_per_epoch: int, t: TrainParams) -> float:
    """Multiplier of ``train.lr`` at optimiser step ``step`` (0-based)."""
    epoch = step / max(steps_per_epoch, 1)  # fractional epochs done
    if epoch < t.warmup_epochs:
        return WARMUP_START + (1 - WARMUP_START) * epoch / t.warmup_epochs
    if t.schedule == "step":
        return STEP_FACTOR if epoch >= STEP_AT * t.epochs else 1.0
    if t.schedule == "cosine":
        span = max(t.epochs - t.warmup_epochs, 1e-9)
        progress = min((epoch - t.warmup_epochs) / span, 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    t: TrainParams) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler following :func:`lr_factor`; call ``step()`` after every optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, t))


def first_validated_epoch(t: TrainParams) -> int:
    """The first epoch (1-based) scored on validation and eligible as the best: after ``train.val_start`` of
    ``train.epochs``; the last epoch always is."""
    return min(int(t.val_start * t.epochs) + 1, t.epochs)


def patience_spent(epoch: int, best_epoch: int, t: TrainParams) -> bool:
    """Whether ``train.patience`` scored epochs have passed without a better one than ``best_epoch``."""
    return epoch - max(best_epoch, first_validated_epoch(t) - 1) >= t.patience
