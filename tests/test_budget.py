"""passes.budget: slice counts chosen for a budget, the floor reported when it cannot be met."""

from __future__ import annotations

import pytest
import torch

from blocks import SpatialBlock, VideoBlock
from fxstream.capture import capture
from fxstream.errors import BudgetError
from passes.budget import forced_chunks, plan_chunks
from passes.chains import group_operators


def planned(module, x):
    gm, groups, _ = group_operators(capture(module, x))
    return gm, groups


def test_minimum_budget_is_no_higher_than_any_forced_slicing():
    gm, groups = planned(VideoBlock(frames=3), torch.randn(12, 8, 12, 8))
    best = plan_chunks(gm, groups, None)
    unsliced = forced_chunks(gm, groups, 1)
    assert best.predicted_peak_bytes < unsliced.predicted_peak_bytes
    for k in (2, 4):
        assert best.predicted_peak_bytes <= forced_chunks(gm, groups, k).predicted_peak_bytes


def test_budget_between_minimum_and_unsliced_is_met_with_fewer_slices():
    gm, groups = planned(SpatialBlock(), torch.randn(16, 8, 12, 12))
    low = plan_chunks(gm, groups, None)
    high = forced_chunks(gm, groups, 1)
    budget = (low.predicted_peak_bytes + high.predicted_peak_bytes) // 2
    mid = plan_chunks(gm, groups, budget)
    assert mid.predicted_peak_bytes <= budget
    assert sum(mid.chunks.values()) <= sum(low.chunks.values())


def test_budget_the_model_already_fits_slices_nothing():
    gm, groups = planned(SpatialBlock(), torch.randn(16, 8, 12, 12))
    result = plan_chunks(gm, groups, 2**40)
    assert all(k == 1 for k in result.chunks.values())


def test_infeasible_budget_raises_with_the_floor_and_the_bounding_node():
    gm, groups = planned(SpatialBlock(), torch.randn(16, 8, 12, 12))
    floor = plan_chunks(gm, groups, None).predicted_peak_bytes
    with pytest.raises(BudgetError) as info:
        plan_chunks(gm, groups, floor // 2)
    assert info.value.min_peak_bytes == floor
    assert info.value.bounding_node and info.value.bounding_node in str(info.value)
