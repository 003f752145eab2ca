"""A sliced group writes its output into the storage of an input that dies at its call (passes.slicing.
write_in_place): the residual stream of a transformer needs one full-size tensor, not two; exact, and only where
no later reader, graph input or cache can see the overwritten tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxstream
from fxstream.measure import measure
from fxstream.runtime.sliced import SlicedCall
from passes import slicing

D = 32


@pytest.fixture(autouse=True)
def _keys_whole(monkeypatch):
    """Plans whose attentions keep their keys and values whole: chunked (passes/keys.py), they would read the
    residual stream whole beside its slices, and nothing could be written in place."""
    from passes import pipeline

    monkeypatch.setattr(pipeline, "KEY_GAIN", 1.0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.f1, self.f2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, 2, D // 2).transpose(1, 2) for t in self.qkv(self.n1(x)).chunk(3, -1))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D))
        return x + self.f2(F.gelu(self.f1(self.n2(x))))


class Transformer(nn.Module):
    """Residual blocks around attention over the tokens (keys and values whole, queries sliced)."""

    def __init__(self, blocks: int = 2, reuse_input: bool = False):
        super().__init__()
        self.inp, self.out = nn.Linear(D, D), nn.Linear(D, D)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.reuse_input = reuse_input

    def forward(self, x):
        h = self.inp(x)
        first = h
        for block in self.blocks:
            h = block(h)
        y = self.out(h)
        if self.reuse_input:  # the first block's input is read again after the blocks (a long skip)
            y = y + first.softmax(dim=1)
        return y


class SkipOnInput(nn.Module):
    """A sliced residual chain straight on the graph input: the caller's tensor must not be overwritten."""

    def __init__(self):
        super().__init__()
        self.f1, self.f2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        h = x + self.f2(F.gelu(self.f1(x)))
        return h.softmax(dim=1) + x.sum(dim=1, keepdim=True)


def _written(compiled) -> list:
    """The input nodes whose storage a sliced call writes an output into."""
    gm = compiled._fx_last.graph_module
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(getattr(gm, n.target), SlicedCall)]
    return [n.args[s.into] for n in calls for s in getattr(gm, n.target).slot_specs if s.into is not None]


def _in_place(compiled) -> int:
    return len(_written(compiled))


def _run(model, x, budget="min", **kw):
    torch.manual_seed(0)
    with torch.no_grad():
        eager = model(x)
        compiled = fxstream.compile(model, budget_gb=budget, **kw)
        out = compiled(x)
        measured = measure(compiled, x).activation_peak_bytes
    return eager, out, compiled, measured


def _exact(out, eager):
    assert (out - eager).abs().max().item() <= 1e-5 * eager.abs().max().item()


@pytest.mark.parametrize("reuse_input", [False, True])
def test_residual_written_in_place_is_exact_and_as_predicted(one_thread, reuse_input):
    torch.manual_seed(0)
    model, x = Transformer(reuse_input=reuse_input).eval(), torch.randn(1, 1024, D)
    eager, out, compiled, measured = _run(model, x)
    _exact(out, eager)
    # the residual adds of the blocks after the first (the first block's input is read again with reuse_input)
    assert _in_place(compiled) >= (1 if reuse_input else 2)
    assert measured == compiled.plan.predicted_activation_peak_bytes


def test_in_place_lowers_the_minimum(one_thread, monkeypatch):
    torch.manual_seed(0)
    model, x = Transformer().eval(), torch.randn(1, 1024, D)
    _, _, _, with_it = _run(model, x)
    monkeypatch.setattr(slicing, "write_in_place", lambda gm, graph: 0)
    eager, out, compiled, without = _run(model, x)
    _exact(out, eager)
    assert _in_place(compiled) == 0
    # about one residual-stream tensor (1024 x 32 fp32 = 128 KiB) fewer at the peak (the peak moves: 126 KiB)
    assert with_it <= without - 96 * 1024


def test_graph_inputs_and_later_readers_are_never_overwritten(one_thread):
    torch.manual_seed(0)
    model, x = SkipOnInput().eval(), torch.randn(1, 1024, D)
    before = x.clone()
    eager, out, compiled, _ = _run(model, x, chunks=4)
    _exact(out, eager)
    assert torch.equal(x, before)
    assert _in_place(compiled) >= 1  # the chain's own intermediates still are
    assert not [n for n in _written(compiled) if n.op == "placeholder"]


def test_chunks_everywhere_with_in_place_is_exact(one_thread):
    torch.manual_seed(0)
    model, x = Transformer(blocks=3, reuse_input=True).eval(), torch.randn(2, 256, D)
    for k in (2, 3, 7):
        eager, out, compiled, measured = _run(model, x, chunks=k)
        _exact(out, eager)
        assert measured == compiled.plan.predicted_activation_peak_bytes
