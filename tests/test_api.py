"""``fxstream.compile`` on every zoo model: exact in fp32, forced slicing and budgets alike; bad arguments.

Exactness is ``max|out - ref| <= 1e-5 * max|ref|`` against the eager module, in fp32, for two seeds (weights
and inputs). Compiling is the slow part (a capture and a plan search, a few seconds per tiny model), and a
compiled graph depends only on the input signature, never on weight or input values. So every compile here
wraps the seed-0 build, and the seed-1 check loads the seed-1 build's weights into that module in place (the
compiled graph shares its parameters) and feeds the seed-1 inputs: the same as compiling the seed-1 build, at
no compile cost. A compiled graph that copied its weights would fail the seed-1 check.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import fxstream
from passes.budget import MIN_SLACK
from fxstream import models
from fxstream.errors import BudgetError
from fxstream.module import StreamlinedModule
from fxstream.runtime.sliced import SlicedCall
from passes.plan import Plan

pytestmark = pytest.mark.usefixtures("one_thread")

# The DiT-era VAE decodes' exactness (lowest and middle budget) and memory are tested in test_rows.py.
NAMES = [n for n in models.names() if models.ZOO[n].module_class not in models.VIDEO_VAE_CLASSES]
SEEDS = (0, 1)
CHUNKS = (2, 3, 7)  # 2 even; 3 and 7 split the 256 latent pixels unevenly; 7 exceeds the 4 frames (capped)
RTOL = 1e-5
GIB = 2**30


def _sample(out) -> torch.Tensor:
    """The sample tensor of a diffusers output (dataclass, tuple or plain tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


@functools.cache
def _build(name: str, seed: int) -> models.BuiltModel:
    return models.build(name, "tiny", seed=seed)


def _module(name: str) -> nn.Module:
    """The module every compile of ``name`` wraps: the seed-0 build."""
    return _build(name, 0).module


@functools.cache
def _reference(name: str, seed: int) -> torch.Tensor:
    built = _build(name, seed)
    with torch.no_grad():
        return _sample(built.module(*built.args, **built.kwargs))


@contextlib.contextmanager
def _seeded(name: str, seed: int) -> Iterator[models.BuiltModel]:
    """The seed-``seed`` build, with its weights loaded into the seed-0 module for the duration."""
    if seed == 0:
        yield _build(name, 0)
        return
    module = _module(name)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(_build(name, seed).module.state_dict())
    try:
        yield _build(name, seed)
    finally:
        module.load_state_dict(saved)


def _assert_exact(compiled: StreamlinedModule, name: str) -> None:
    for seed in SEEDS:
        with _seeded(name, seed) as built, torch.no_grad():
            out = _sample(compiled(*built.args, **built.kwargs))
        ref = _reference(name, seed)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        err = (out - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= RTOL * scale, f"{name} seed {seed}: max|out - ref| = {err:.3g} > {RTOL} * {scale:.3g}"


@functools.cache
def _minimum(name: str) -> StreamlinedModule:
    """``name`` compiled for the smallest peak (budget None), compiled for the tiny signature."""
    compiled = fxstream.compile(_module(name))
    built = _build(name, 0)
    with torch.no_grad():
        compiled(*built.args, **built.kwargs)
    return compiled


@functools.cache
def _forced(name: str, chunks: int) -> StreamlinedModule:
    return fxstream.compile(_module(name), chunks=chunks)


# -- exactness -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("name", NAMES)
def test_forced_chunks_are_exact(name, chunks):
    compiled = _forced(name, chunks)
    _assert_exact(compiled, name)
    plan = compiled.plan
    assert plan.budget_bytes is None
    assert plan.candidate_groups > 0
    # ``chunks`` slices every operator group (capped at its axis length): all of them are sliced.
    assert plan.sliced_groups
    assert len(plan.sliced_groups) == plan.candidate_groups
    assert all(1 < g.slices <= min(chunks, g.length) for g in plan.groups)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_minimum_budget_is_exact_and_below_baseline(name):
    compiled = _minimum(name)
    _assert_exact(compiled, name)
    plan = compiled.plan
    assert plan.budget_bytes is None
    assert plan.weight_bytes > 0
    assert plan.weight_bytes < plan.predicted_peak_bytes < plan.baseline_peak_bytes
    assert plan.peak_node


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_budget_between_minimum_and_baseline_is_met_and_exact(name):
    minimum = _minimum(name).plan
    budget_gb = (minimum.predicted_peak_bytes + minimum.baseline_peak_bytes) / 2 / GIB
    compiled = fxstream.compile(_module(name), budget_gb)
    _assert_exact(compiled, name)
    plan = compiled.plan
    assert plan.budget_bytes == int(budget_gb * GIB)
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    # No budget reaches below the minimum.
    assert plan.predicted_peak_bytes >= minimum.predicted_peak_bytes
    assert plan.baseline_peak_bytes == minimum.baseline_peak_bytes


@pytest.mark.slow
def test_uneven_frame_slices_are_exact():
    """5 frames in 3 slices (2 + 2 + 1; 10 = batch x frames in 4 + 4 + 2), and other axes split unevenly too:
    the short last slice runs its own body."""
    built = models.build("svd", "tiny", frames=5, seed=2)
    compiled = fxstream.compile(built.module, chunks=3)
    with torch.no_grad():
        ref = _sample(built.module(*built.args, **built.kwargs))
        out = _sample(compiled(*built.args, **built.kwargs))
    assert (out - ref).abs().max().item() <= RTOL * ref.abs().max().item()
    calls = [m for m in compiled.compiled.graph_module.modules() if isinstance(m, SlicedCall)]
    uneven = {c.length for c in calls if len({b - a for a, b in c.bounds}) > 1}
    frame_axes = {5, 10}
    assert uneven & frame_axes and uneven - frame_axes, uneven


def test_budget_above_baseline_leaves_the_model_unsliced():
    name = "sd-vae-decoder"
    baseline = _minimum(name).plan.baseline_peak_bytes
    compiled = fxstream.compile(_module(name), 2 * baseline / GIB)
    _assert_exact(compiled, name)
    assert compiled.plan.sliced_groups == []
    assert not any(isinstance(m, SlicedCall) for m in compiled.compiled.graph_module.modules())


def test_plan_slice_counts_are_the_slices_that_run():
    """4 frames asked for in 3 slices run as 2 + 2: the plan must say 2, the count that runs."""
    compiled = _forced("sd-vae-decoder", 3)
    built = _build("sd-vae-decoder", 0)
    with torch.no_grad():
        compiled(*built.args, **built.kwargs)
    ran = {
        m.group_name: len(m.bounds)
        for m in compiled.compiled.graph_module.modules()
        if isinstance(m, SlicedCall)
    }
    assert ran
    assert compiled.plan.chunks() == ran


# -- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"budget_gb": 0}, "budget_gb"),
        ({"budget_gb": -1.5}, "budget_gb"),
        ({"budget_gb": math.nan}, "budget_gb"),
        ({"chunks": 0}, "chunks"),
        ({"chunks": -2}, "chunks"),
        ({"chunks": 2.5}, "chunks"),
        ({"target": "tpu"}, "target"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, argument):
    # Raised by compile itself, before any capture: a plain module that could not be captured is enough.
    with pytest.raises(ValueError, match=argument):
        fxstream.compile(nn.Linear(4, 4), **kwargs)


def test_non_numeric_budget_raises_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="budget_gb"):
        fxstream.compile(nn.Linear(4, 4), "8")


def test_non_module_raises_value_error():
    with pytest.raises(ValueError, match="module"):
        fxstream.compile(lambda x: x)


@pytest.mark.slow
def test_infeasible_budget_raises_budget_error_with_the_floor():
    name = "svd"
    budget_gb = 1e-6
    compiled = fxstream.compile(_module(name), budget_gb)  # planning is lazy: nothing raised yet
    built = _build(name, 0)
    with pytest.raises(BudgetError) as info, torch.no_grad():
        compiled(*built.args, **built.kwargs)
    err = info.value
    assert err.min_peak_bytes > budget_gb * GIB
    assert err.bounding_node
    assert f"'{err.bounding_node}'" in str(err)
    # The floor it reports is the peak a minimum-budget compile predicts, which may stay MIN_SLACK above it
    # rather than slice every small group.
    minimum = _minimum(name).plan.predicted_peak_bytes
    assert err.min_peak_bytes <= minimum <= err.min_peak_bytes * (1 + MIN_SLACK)
    assert compiled.plan is None  # no half-built entry was cached


def test_the_reported_floor_is_reachable_and_one_byte_less_is_not():
    name = "sd-vae-decoder"
    floor = _minimum(name).plan.predicted_peak_bytes
    built = _build(name, 0)
    at_floor = fxstream.compile(_module(name), floor / GIB)
    with torch.no_grad():
        at_floor(*built.args, **built.kwargs)
    assert at_floor.plan.budget_bytes == floor
    assert at_floor.plan.predicted_peak_bytes <= floor
    below = fxstream.compile(_module(name), (floor - 1) / GIB)
    with pytest.raises(BudgetError) as info, torch.no_grad():
        below(*built.args, **built.kwargs)
    assert info.value.min_peak_bytes == floor


def test_plan_is_exported_at_top_level():
    assert fxstream.Plan is Plan
    assert fxstream.StreamlinedModule is StreamlinedModule
