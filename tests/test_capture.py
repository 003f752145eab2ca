"""fxstream.capture: torch.export with static shapes, tensor timesteps and named failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxstream.capture import capture, normalize_inputs
from fxstream.errors import CaptureError


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, sample, timestep):
        return self.lin(sample) * timestep


def test_python_number_timestep_becomes_a_tensor_and_is_not_baked_in():
    m = Scaled()
    x = torch.randn(2, 4)
    gm = capture(m, x, 10)
    args, kwargs = normalize_inputs(m, (x,), {"timestep": 3})
    assert isinstance(args[1], torch.Tensor) and args[1].dim() == 0
    assert torch.allclose(gm(*args, **kwargs), m(x, 3))


def test_capture_on_meta_tensors_allocates_nothing():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4096, 4096), nn.GELU(), nn.Linear(4096, 4096))
    gm = capture(m, torch.empty(64, 4096, device="meta"))
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "call_function"]
    assert vals and all(v.device.type == "meta" for v in vals)


def test_export_checks_are_stripped():
    class Cast(nn.Module):
        def forward(self, x):
            return x.to(torch.float16) * 2

    gm = capture(Cast(), torch.randn(3))
    assert not any(n.target is torch.ops.aten._assert_tensor_metadata.default for n in gm.graph.nodes)


def test_conversions_to_another_tensors_type_read_only_its_dtype():
    """``x.type_as(y)`` and ``x.to(y)`` become ``to(dtype)``: ``y`` is no operand (it would be kept alive, and
    read whole by every slice of a group), and the numbers are the same."""

    class Convert(nn.Module):
        def forward(self, x, y):
            a = (x * 2).type_as(y)  # to y's dtype: a conversion
            b = (x + 1).to(x)  # to x's own dtype: returns its input
            return a + b.to(y), y.sum()

    x, y = torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)
    gm = capture(Convert(), x, y)
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten.type_as.default not in targets and torch.ops.aten.to.other not in targets
    readers_of_y = [u for n in gm.graph.nodes if n.op == "placeholder" and n.name == "y" for u in n.users]
    assert all(u.target is not torch.ops.aten.to.dtype for u in readers_of_y)
    out, ref = gm(x, y), Convert()(x, y)
    assert out[0].dtype == ref[0].dtype == torch.float64 and torch.equal(out[0], ref[0])


def test_parts_of_a_split_are_slices_of_its_input():
    """``split`` / ``split_with_sizes`` / ``chunk`` read with ``getitem`` become one ``aten.slice`` per part: the
    same views (no copy), and the passes see tensors with slice rules, not lists."""

    class Split(nn.Module):
        def forward(self, x):
            first, rest = x.split([1, 3], dim=2)
            a, b = x.chunk(2, dim=-1)
            c, d = torch.split(x, 2, dim=1)
            return first * 2 + rest[:, :, :1], a - b, c * d

    x = torch.randn(2, 4, 4, 6)
    gm = capture(Split(), x)
    splits = (torch.ops.aten.split_with_sizes.default, torch.ops.aten.split.Tensor, torch.ops.aten.chunk.default)
    assert not any(n.target in splits for n in gm.graph.nodes)
    slices = [n for n in gm.graph.nodes if n.target is torch.ops.aten.slice.Tensor and n.args[0].op == "placeholder"]
    assert len(slices) == 6  # first, rest, a, b, c, d
    for got, ref in zip(gm(x), Split()(x)):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_meshgrid_grids_are_views_of_their_inputs(indexing):
    """Each grid of ``meshgrid`` becomes its 1-D input viewed along its own dim and expanded (no copy, each with
    a dims rule): the same values for both indexings and for three inputs."""

    class Grid(nn.Module):
        def forward(self, a, b, c):
            x, y = torch.meshgrid(a, b, indexing=indexing)
            p, q, r = torch.meshgrid(a, b, c, indexing=indexing)
            return torch.where(x <= y, 0.0, -1.0), p * q + r

    args = (torch.arange(3.0), torch.arange(5.0) * 2, torch.arange(2.0) - 7)
    gm = capture(Grid(), *args)
    assert not any(n.target in (torch.ops.aten.meshgrid.default, torch.ops.aten.meshgrid.indexing)
                   for n in gm.graph.nodes)
    expands = [n for n in gm.graph.nodes if n.target is torch.ops.aten.expand.default]
    assert len(expands) == 5
    for got, ref in zip(gm(*args), Grid()(*args)):
        assert got.shape == ref.shape and torch.equal(got, ref)


def test_values_nothing_reads_are_not_in_the_graph():
    """A value the module computes and drops (a causal convolution's cache after the last chunk) is not captured:
    it would be held, and a value leaving a row-streamed segment stops it."""

    class Drops(nn.Module):
        def forward(self, x):
            y = x.sin()
            cache = y[:, -2:].clone()  # noqa: F841 (computed, never read)
            return y * 2

    gm = capture(Drops(), torch.randn(3, 5))
    assert not any(n.target is torch.ops.aten.clone.default for n in gm.graph.nodes)


def test_capture_failure_names_the_module_and_operation():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), DataDependent())

        def forward(self, x):
            return self.body(x)

    with pytest.raises(CaptureError) as info:
        capture(Outer(), torch.randn(2, 4))
    assert info.value.module_path == "body.1"
    assert "body.1" in str(info.value) and "x.sum() > 0" in str(info.value)


def test_arguments_that_do_not_match_the_signature_are_a_value_error():
    with pytest.raises(ValueError, match="arguments do not match"):
        capture(Scaled(), torch.randn(2, 4), 1, 2, 3)


class _AutocastOnInputDevice(nn.Module):
    """Mochi's rotary embedding: ``with torch.autocast(freqs.device.type, torch.float32)`` around its einsum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, torch.float32):
            return x @ x.transpose(-1, -2)


def test_an_autocast_region_for_the_inputs_device_captures_on_meta_as_on_the_cpu():
    m = _AutocastOnInputDevice()
    x = torch.randn(2, 8, 4)
    with pytest.raises(RuntimeError, match="meta"):
        m(x.to("meta"))  # torch refuses autocast for device type "meta"
    with pytest.warns(UserWarning, match="not supported. Disabling autocast"):
        on_cpu = capture(m, x)
    on_meta = capture(m, x.to("meta"))
    assert [n.target for n in on_meta.graph.nodes] == [n.target for n in on_cpu.graph.nodes]
    assert on_meta(x.to("meta")).dtype == on_cpu(x).dtype == torch.float32
    assert torch.autocast is torch.amp.autocast_mode.autocast  # put back


# -- captures kept per module ----------------------------------------------------------------------------------


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.double = False

    def forward(self, sample):
        y = self.lin(sample)
        return y * 2 if self.double else y


def _counting_exports(monkeypatch) -> list:
    calls = []
    real = torch.export.export

    def export(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    return calls


def test_a_module_is_exported_once_per_inputs_and_guard_reading(monkeypatch):
    import importlib

    capture_module = importlib.import_module("fxstream.capture")
    calls = _counting_exports(monkeypatch)
    m, x = Flagged(), torch.randn(3, 4)
    first, second = capture(m, x), capture(m, x)
    assert len(calls) == 1
    assert first is not second  # copies: a pass rewriting one never touches the other or the kept graph
    assert torch.equal(second(x), m(x))
    capture(m, torch.randn(5, 4))  # other shapes
    assert len(calls) == 2
    m.double = True  # an attribute the guard reads: the kept graph would be stale
    assert torch.equal(capture(m, x)(x), m(x)) and len(calls) == 3
    m.lin.weight = nn.Parameter(torch.randn(4, 4))  # a replaced parameter
    assert torch.equal(capture(m, x)(x), m(x)) and len(calls) == 4
    with torch.no_grad():
        m.lin.weight.mul_(2)  # values edited in place: the graph reads the same tensor
    assert torch.equal(capture(m, x)(x), m(x)) and len(calls) == 4
    capture_module.forget_captures(m)
    capture(m, x)
    assert len(calls) == 5


def test_autocast_and_grad_modes_get_graphs_of_their_own(monkeypatch):
    calls = _counting_exports(monkeypatch)
    m, x = Flagged(), torch.randn(3, 4)
    with torch.no_grad():
        plain = capture(m, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cast = capture(m, x)
    capture(m, x)  # grad mode on
    assert len(calls) == 3
    def out_dtype(gm):
        (out,) = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes
        return out.meta["val"].dtype

    assert (out_dtype(plain), out_dtype(cast)) == (torch.float32, torch.bfloat16)


def test_kept_captures_do_not_keep_the_module_alive():
    # in a fresh process: what other tests leave behind in this one (torch.compile's caches) may hold modules too
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import gc, weakref, torch, fxstream
from tests.test_capture import Flagged
m, x = Flagged(), torch.randn(3, 4)
compiled = fxstream.compile(m, chunks=2)
with torch.no_grad():
    compiled(x)
from fxstream.capture import _CAPTURES as kept
assert len(kept) == 1
alive = weakref.ref(m), weakref.ref(m.lin.weight)
del compiled, m
gc.collect()
assert all(r() is None for r in alive) and len(kept) == 0
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
