"""passes/functional.py: in-place writes through views become values, so no pass can move a reader across one.

FreeU writes into slices (``hidden[:, :half] *= b1`` as ``copy_``, its Fourier mask as ``fill_``); before this
pass the planner recomputed the mask per slice without the write, and the compiled UNet was 20% off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxstream
from fxstream.capture import capture
from passes.functional import functionalize, mutations

RTOL = 1e-5


class Writes(nn.Module):
    """Per-frame work with in-place writes through slice, select and whole-tensor views of computed tensors and
    into a computed tensor itself, and reads of those views (taken before the write) after it."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        half = h.shape[1] // 2
        head = h[:, :half]  # a view taken before the write, read after it
        h[:, :half] = h[:, :half] * 1.5  # copy_ through a slice
        mask = torch.ones(h.shape)  # a factory, as FreeU builds its Fourier mask
        mask[..., 1:3, 2:4] = 0.25  # fill_ through two slices
        mask[:, 0] = 2.0  # fill_ through a select
        h = torch.nn.functional.silu(h * mask) * head.sum(1, keepdim=True)
        whole = h[...]  # a view of the whole tensor (aten.alias)
        whole += 0.5  # add_ through it
        out = self.out(h)
        out.mul_(2.0)  # in place on a computed tensor itself
        return out


class WritesInput(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y * 2
        x[:, 0] = 0.0  # a write into the caller's tensor: left as it is
        return self.conv(torch.relu(y)) + x


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def test_writes_through_views_become_values():
    torch.manual_seed(0)
    m = Writes().eval()
    x = torch.randn(4, 8, 6, 6)
    gm = capture(m, x)
    assert not mutations(gm), [n.format_node() for n in mutations(gm)]
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten.slice_scatter.default in targets and torch.ops.aten.select_scatter.default in targets
    with torch.no_grad():
        ref = m(x)
        assert _rel(gm(x), ref) == 0.0  # the same ops on the same values


@pytest.mark.parametrize("chunks", [2, 4])
def test_a_sliced_graph_with_writes_is_exact(chunks):
    torch.manual_seed(0)
    m = Writes().eval()
    x = torch.randn(4, 8, 6, 6)
    compiled = fxstream.compile(m, chunks=chunks)
    with torch.no_grad():
        ref = m(x)
        out = compiled(x)
    assert compiled.plan.sliced_groups, "nothing was sliced: the test would not see a misplaced write"
    assert _rel(out, ref) <= RTOL


def test_functionalize_leaves_graphs_without_writes_alone():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.SiLU())
    gm = capture(m, torch.randn(2, 4, 5, 5))
    before = [n.format_node() for n in gm.graph.nodes]
    assert functionalize(gm) == 0
    assert [n.format_node() for n in gm.graph.nodes] == before


def test_a_write_into_an_input_runs_the_graph_whole_with_a_note():
    torch.manual_seed(0)
    m = WritesInput().eval()
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        ref = m(x.clone())
        compiled = fxstream.compile(m, chunks=2)
        with pytest.warns(fxstream.errors.PlanningWarning, match="writes in place"):
            out = compiled(x.clone())
    assert not compiled.plan.sliced_groups and "writes in place" in compiled.plan.notes[0]
    assert _rel(out, ref) == 0.0


class WritesUnderAReshape(nn.Module):
    """A reshape of the tensor taken before the write and read after it: a view in eager (contiguous), so it
    reads the written values; the graph cannot tell a reshape's view from its copy, so the write stays."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        flat = h.reshape(h.shape[0], -1)
        h[:, :2] = 0.0
        return self.conv(h) + flat.sum(1).view(-1, 1, 1, 1)


def test_a_write_under_another_alias_is_left_and_the_graph_runs_whole():
    torch.manual_seed(0)
    m = WritesUnderAReshape().eval()
    x = torch.randn(4, 8, 6, 6)
    gm = capture(m, x)
    assert mutations(gm)  # not rewritten
    with torch.no_grad():
        ref = m(x)
        compiled = fxstream.compile(m, chunks=2)
        with pytest.warns(fxstream.errors.PlanningWarning, match="writes in place"):
            out = compiled(x)
    assert _rel(out, ref) == 0.0


class WritesThroughANoOpConversion(nn.Module):
    """HunyuanVideo's token refiner: ``mask = (a & b).bool(); mask[:, :, :, 0] = True`` on a mask that is
    already bool (``.bool()`` returns the tensor itself); the mask and a read of ``a & b`` after the write."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        both = (h > 0) & (h < 1)
        mask = both.bool()
        mask[:, :, :, 0] = True
        return self.conv(torch.where(mask, h, -h)) + both.float()


def test_a_write_through_a_conversion_that_converts_nothing_becomes_a_value():
    torch.manual_seed(0)
    m = WritesThroughANoOpConversion().eval()
    x = torch.randn(4, 8, 6, 6)
    gm = capture(m, x)
    assert not mutations(gm), [n.format_node() for n in mutations(gm)]
    with torch.no_grad():
        ref = m(x)
        assert _rel(gm(x), ref) == 0.0
        compiled = fxstream.compile(m, chunks=2)
        out = compiled(x)
    assert compiled.plan.sliced_groups
    assert _rel(out, ref) <= RTOL


class StridedWrites(nn.Module):
    """Wan's rotary embedding: ``out = empty_like(x); out[..., 0::2] = a; out[..., 1::2] = b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 1::2] * 2
        out[..., 1::2] = x[..., 0::2] - 1
        return out + 1


def test_the_views_a_write_went_through_are_gone_with_it():
    """Written views nothing reads any more are erased: a dead view of a group's tensor would be an output of
    the group of its own, keeping the tensor alive whole."""
    m = StridedWrites()
    x = torch.randn(2, 16, 8)
    gm = capture(m, x)
    assert not mutations(gm)
    dead = [n for n in gm.graph.nodes if n.op == "call_function" and not n.users]
    assert not dead, [n.format_node() for n in dead]
    assert torch.equal(gm(x), m(x))


class TensorFromData(nn.Module):
    """FreeNoise's frame weights: ``torch.tensor(list)`` in a forward, which export writes as a lifted constant,
    ``lift_fresh_copy`` and an in-place ``detach_`` (autograd metadata only)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor([0.5, 1.0, 2.0, 1.0], dtype=x.dtype).unsqueeze(-1)
        return self.proj(torch.relu(self.proj(x)) * weights)


def test_detach_in_place_of_a_constant_becomes_a_value_and_the_graph_slices():
    torch.manual_seed(0)
    m, x = TensorFromData().eval(), torch.randn(4, 4, 8)
    gm = capture(m, x)
    assert not mutations(gm), [n.format_node() for n in mutations(gm)]
    assert torch.ops.aten.detach.default in {n.target for n in gm.graph.nodes}
    compiled = fxstream.compile(m, chunks=2)
    with torch.no_grad():
        ref = m(x)
        out = compiled(x)
    assert compiled.plan.sliced_groups and not compiled.plan.notes
    assert _rel(out, ref) <= RTOL
