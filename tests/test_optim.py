"""Optimiser and learning-rate schedules from train.*."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rcnn.engine.optim import build_optimizer, build_scheduler, first_validated_epoch, lr_factor, patience_spent
from rcnn.pipeline.params import TrainParams


def test_warmup_then_cosine_reaches_zero_at_the_last_epoch():
    t = dataclasses.replace(TrainParams(), epochs=10, warmup_epochs=2, schedule="cosine")
    assert lr_factor(0, 5, t) == pytest.approx(0.1)
    assert lr_factor(5, 5, t) == pytest.approx(0.55)  # half-way through the warm-up
    assert lr_factor(10, 5, t) == pytest.approx(1.0)
    assert lr_factor(30, 5, t) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(50, 5, t) == pytest.approx(0.0, abs=1e-9)


def test_step_schedule_divides_by_ten_after_two_thirds():
    t = dataclasses.replace(TrainParams(), epochs=9, schedule="step")
    assert [lr_factor(e * 4, 4, t) for e in (0, 5, 6, 8)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]
    assert lr_factor(100, 4, dataclasses.replace(t, schedule="constant")) == 1.0


def test_optimizers_follow_params_and_skip_frozen_weights():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    sgd = build_optimizer(model.parameters(), dataclasses.replace(TrainParams(), optimizer="sgd", lr=0.1,
                                                                  momentum=0.8, weight_decay=0.01))
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups[0]["params"]) == 2
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["weight_decay"] == 0.01
    t = dataclasses.replace(TrainParams(), lr=0.1, warmup_epochs=1, epochs=3)
    adam = build_optimizer(model.parameters(), t)
    assert isinstance(adam, torch.optim.Adam)
    scheduler = build_scheduler(adam, 2, t)
    assert adam.param_groups[0]["lr"] == pytest.approx(0.01)
    adam.step()
    scheduler.step()
    assert adam.param_groups[0]["lr"] == pytest.approx(0.055)


def test_first_validated_epoch_and_patience_follow_val_start():
    assert first_validated_epoch(TrainParams(epochs=24)) == 1
    assert first_validated_epoch(TrainParams(epochs=24, val_start=0.5)) == 13
    assert first_validated_epoch(TrainParams(epochs=1, val_start=0.9)) == 1  # the last epoch is always scored
    t = TrainParams(epochs=10, patience=2, val_start=0.5)  # scored from epoch 6
    assert not patience_spent(5, 0, t) and not patience_spent(6, 6, t) and patience_spent(7, 0, t)
    assert patience_spent(8, 6, t) and not patience_spent(8, 7, t)
