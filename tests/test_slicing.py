"""passes.slicing and fxstream.runtime.sliced: outlined groups run slice by slice, exactly."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blocks import SpatialBlock, TemporalBlock, VideoBlock
from fxstream.capture import capture
from fxstream.runtime.sliced import SlicedCall, slice_bounds
from passes.chains import group_operators
from passes.meta import node_info
from passes.slicing import PlanningView, apply_plan


@pytest.mark.parametrize("length, chunks", [(7, 1), (7, 2), (7, 3), (7, 4), (7, 7), (6, 4), (5, 9)])
def test_slice_bounds_cover_the_axis_once(length, chunks):
    bounds = slice_bounds(length, chunks)
    covered = [i for a, b in bounds for i in range(a, b)]
    assert covered == list(range(length))
    sizes = [b - a for a, b in bounds]
    assert all(s == sizes[0] for s in sizes[:-1]) and sizes[-1] <= sizes[0]
    assert len(bounds) == min(chunks, length) or len(set(sizes)) > 1 or length % chunks


def test_slice_bounds_rejects_zero_chunks():
    with pytest.raises(ValueError, match="chunks"):
        slice_bounds(4, 0)


@pytest.mark.parametrize("module, shape", [
    (SpatialBlock(), (7, 8, 5, 5)),
    (TemporalBlock(), (1, 8, 3, 7, 5)),
    (VideoBlock(frames=3), (6, 8, 7, 5)),
])
@pytest.mark.parametrize("chunks", [2, 3, 4, 7])
def test_sliced_graph_equals_eager(module, shape, chunks):
    torch.manual_seed(chunks)
    x = torch.randn(shape)
    ref = module(x)
    gm = capture(module, x)
    gm, groups, _ = group_operators(gm)
    sliced = apply_plan(gm, groups, {g.name: chunks for g in groups})
    calls = [m for m in sliced.modules() if isinstance(m, SlicedCall)]
    assert calls, "nothing was sliced"
    out = sliced(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_outputs_are_written_into_preallocated_buffers_not_concatenated():
    module = SpatialBlock()
    x = torch.randn(6, 8, 5, 5)
    gm = capture(module, x)
    gm, groups, _ = group_operators(gm)
    sliced = apply_plan(gm, groups, {g.name: 3 for g in groups})
    with OpLog() as log:
        sliced(x)
    assert torch.ops.aten.cat.default not in log.ops and torch.ops.aten.stack.default not in log.ops
    assert torch.ops.aten.copy_.default in log.ops


def test_multi_pass_group_recomputes_instead_of_keeping_full_tensors():
    module = TemporalBlock()
    x = torch.randn(1, 8, 3, 7, 5)
    gm = capture(module, x)
    gm, groups, _ = group_operators(gm)
    sliced = apply_plan(gm, groups, {g.name: 3 for g in groups})
    call = next(m for m in sliced.modules() if isinstance(m, SlicedCall) and len(m.pass_specs) > 1)
    assert len(call.pass_specs) >= 2
    # later passes read the complete statistics of earlier ones
    assert any(reduced for _, reduced in call.pass_specs[1:])


def test_planning_view_records_workspace_without_building_bodies():
    module = VideoBlock(frames=3)
    x = torch.randn(6, 8, 7, 5)
    gm = capture(module, x)
    gm, groups, _ = group_operators(gm)
    view = apply_plan(gm, groups, {g.name: 2 for g in groups}, planning=True)
    assert isinstance(view, PlanningView)
    calls = [n for n in view.graph.nodes if n.op == "call_module"
             and isinstance(getattr(view, n.target, None), SlicedCall)]
    assert calls
    for n in calls:
        assert node_info(n).workspace_bytes > 0
        assert all(len(b) == 0 for b in getattr(view, n.target).bodies)


@pytest.mark.parametrize("name", ["svd"])
def test_sliced_graph_memory_is_what_the_plan_predicts(name):
    """Each buffer the loop keeps is one the memory model counts: no output buffer for a view of another
    output, no slice result kept past its copy. (The decoder's minimum, sliced groups and row-streamed tail
    together: tests/test_rows.py, which compiles it anyway.)"""
    import fxstream
    from fxstream.capture import normalize_inputs
    from fxstream.measure import measure
    from fxstream.models import build

    built = build(name, "tiny")
    compiled = fxstream.compile(built.module)
    with torch.no_grad():
        compiled(*built.args, **built.kwargs)
    entry = compiled.compiled
    assert entry.plan.sliced_groups
    args, kwargs = normalize_inputs(built.module, built.args, built.kwargs)
    measured = measure(entry.graph_module, *args, **kwargs).activation_peak_bytes
    predicted = entry.plan.predicted_activation_peak_bytes
    assert abs(measured - predicted) <= 0.05 * measured
