"""Seeded sections of training (RoI samples of validation, new layers' weights) restore every torch generator
after them, the accelerator's included, and resume points carry the accelerator's generator state."""

from __future__ import annotations

import pytest
import torch

from rcnn.engine.device import accelerator_rng_state, restore_accelerator_rng_state, seeded_rng

ACCELERATOR = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None


def test_a_seeded_section_draws_the_same_numbers_and_leaves_the_callers_generator_as_it_was():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with seeded_rng(7):
        first = torch.rand(4)
    with seeded_rng(7):
        second = torch.rand(4)
    assert torch.equal(first, second)
    assert torch.equal(torch.rand(3), expected_next)  # as if the seeded sections had not run


def test_a_resume_point_from_another_machine_leaves_this_ones_accelerator_alone():
    foreign = {"type": "no-such-accelerator", "states": [torch.zeros(8, dtype=torch.uint8)]}
    assert restore_accelerator_rng_state(foreign) is False
    assert restore_accelerator_rng_state(None) is False  # a resume point saved before the entry existed
    if ACCELERATOR is None:
        assert accelerator_rng_state() is None


@pytest.mark.skipif(ACCELERATOR is None, reason="needs a GPU (CUDA or MPS): the CPU's generator is tested above")
def test_the_accelerators_generator_continues_past_a_seeded_section_and_round_trips_a_resume_point():
    module = torch.get_device_module(ACCELERATOR.type)
    device = torch.device(ACCELERATOR.type)
    torch.manual_seed(5)
    before = module.get_rng_state()
    expected = torch.rand(4, device=device)
    module.set_rng_state(before)
    with seeded_rng(11):
        torch.rand(4, device=device)
    assert torch.equal(torch.rand(4, device=device), expected)  # not restarted from seed 11's state
    saved = accelerator_rng_state()
    after_save = torch.rand(4, device=device)
    torch.manual_seed(99)
    assert restore_accelerator_rng_state(saved) is True
    assert torch.equal(torch.rand(4, device=device), after_save)
