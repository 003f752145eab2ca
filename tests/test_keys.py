"""Key-chunked attention (passes/keys.py, fxstream/runtime/keys.py): an attention's keys and values made chunk by
chunk from what they are made of, combined by log-sum-exp; exact against eager, planned only where it lowers the
minimum, replayed from a saved Plan."""

from __future__ import annotations

import functools

import pytest
import torch

import fxstream
from fxstream import models
from fxstream.capture import capture, normalize_inputs
from fxstream.report import groups_line
from fxstream.runtime.keys import KeyChunkedAttention, attention_with_lse
from fxstream.runtime.sliced import SlicedInput
from passes import pipeline
from passes.keys import chunk_keys, is_key_chunked, key_cones
from passes.slicing import copy_graph_module
from passes.timing import costs_for, graph_seconds, recomputed

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL = 1e-5


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert float((got - ref).abs().max()) <= RTOL * float(ref.abs().max())


def _sample(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out


class _Identity(torch.nn.Module):
    def forward(self, k, v):
        return k, v


@pytest.mark.parametrize("chunks", [1, 2, 3, 7])
def test_chunks_combine_to_the_attention_over_every_key(chunks):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 13, 8), 5 * torch.randn(2, 3, 13, 8)
    lengths = {b - a for a, b in fxstream.runtime.sliced.slice_bounds(13, chunks)}
    op = KeyChunkedAttention("t", {n: _Identity() for n in lengths}, chunks, 13, [SlicedInput(2), SlicedInput(2)],
                             0.3, 8, 0)
    _close(op(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_math_path_log_sum_exp():
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 3)  # value width differs
    out, lse = attention_with_lse(q, k, v, None)
    _close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    _close(lse, (q @ k.transpose(-1, -2) / 2).logsumexp(-1))


@functools.cache
def _tiny(name: str):
    m = models.build(name, "tiny")
    gm = capture(m.module, *m.args, **m.kwargs)
    return m, gm


@pytest.mark.parametrize("name", ["wan2.1-1.3b", "ltx-video", "cogvideox-5b"])
def test_chunked_graph_is_exact(name):
    m, gm = _tiny(name)
    cones = key_cones(gm)
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    # self and joint attention only: a cross-attention's keys are the prompt's, fewer than the queries
    assert cones and all(c.attention in sdpa for c in cones)
    assert all(val_k(c) >= val_q(c) for c in cones)
    work = copy_graph_module(gm)[0]
    done = chunk_keys(work, chunks=3)
    work.recompile()
    assert len(done) == len(cones)
    assert sum(1 for n in work.graph.nodes if is_key_chunked(n)) == len(cones)
    assert not any(n.name == c.attention.name for c in done for n in work.graph.nodes)
    args, kwargs = normalize_inputs(m.module, m.args, m.kwargs)
    with torch.no_grad():
        _close(_sample(work(*args, **kwargs)), _sample(gm(*args, **kwargs)))


def val_k(cone) -> int:
    return cone.attention.args[1].meta["val"].shape[-2]


def val_q(cone) -> int:
    return cone.attention.args[0].meta["val"].shape[-2]


def test_masked_causal_and_cross_attention_are_left_alone():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))

        def forward(self, x, ctx, mask):
            def heads(t):
                return t.unflatten(-1, (2, 8)).transpose(1, 2)
            f = torch.nn.functional.scaled_dot_product_attention
            a = f(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
            b = f(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=mask)
            c = f(heads(self.q(x)), heads(self.k(ctx)), heads(self.v(ctx)))
            return x + (a + b + c).transpose(1, 2).flatten(2)

    gm = capture(Block(), torch.randn(1, 12, 16), torch.randn(1, 4, 16), torch.zeros(12, 12, dtype=torch.bool))
    assert key_cones(gm) == []


def test_time_model_counts_the_chain_once_per_call():
    _, gm = _tiny("wan2.1-1.3b")
    work = copy_graph_module(gm)[0]
    chunk_keys(work, chunks=2)
    node = next(n for n in work.graph.nodes if is_key_chunked(n))
    once, dispatches = recomputed(node, 1)
    thrice, _ = recomputed(node, 3)
    assert once and len(thrice) == 3 * len(once) and dispatches == node.target.cone_nodes * 2
    assert {c.kind for c in once} >= {"matmul"}  # the key and value projections
    costs = costs_for("cpu")
    # the chunked graph makes keys and values once, as eager does: about the same seconds, never fewer FLOPs
    assert graph_seconds(work, costs) >= 0.9 * graph_seconds(gm, costs)


@functools.cache
def _medium_wan():
    return models.build("wan2.1-1.3b", "medium")


def test_minimum_chunks_keys_where_that_lowers_the_peak_exact_at_the_predicted_peak(monkeypatch, tmp_path):
    monkeypatch.setenv("FXSTREAM_PLAN_CACHE", "0")
    m = _medium_wan()
    with torch.no_grad():
        eager = fxstream.measure(m.module, *m.args, **m.kwargs)
    compiled = fxstream.compile(m.module)
    with torch.no_grad():
        compiled(*m.args, **m.kwargs)
        got = fxstream.measure(compiled, *m.args, **m.kwargs)
    plan = compiled.plan
    keyed = [g for g in plan.groups if g.kind == "keys"]
    assert len(keyed) == 2  # the two blocks' self-attentions
    assert "2 attentions make their keys and values chunk by chunk" in groups_line(plan)
    _close(_sample(got.output), _sample(eager.output))
    predicted = plan.predicted_activation_peak_bytes
    assert abs(got.activation_peak_bytes - predicted) <= 0.10 * predicted
    # lower than the same planner without key chunking
    monkeypatch.setattr(pipeline, "KEY_GAIN", 2.0)
    plain = fxstream.plan(m.module, *m.args, **m.kwargs)
    assert not [g for g in plain.groups if g.kind == "keys"]
    assert predicted <= 0.95 * plain.predicted_activation_peak_bytes
    assert plan.predicted_slowdown > plain.predicted_slowdown  # the keys recomputed per query slice
    # a budget the plan without it meets does not chunk keys (fastest plan that fits)
    roomy = fxstream.plan(m.module, *m.args, budget_gb=(plain.predicted_peak_bytes + 1) / 2**30, **m.kwargs)
    assert not [g for g in roomy.groups if g.kind == "keys"]
    # the saved plan replays: same decisions, same output
    path = tmp_path / "plan.json"
    plan.to_json(path)
    monkeypatch.setattr(pipeline, "KEY_GAIN", 0.05)
    replayed = fxstream.compile(m.module, plan=fxstream.Plan.from_json(path))
    with torch.no_grad():
        _close(_sample(replayed(*m.args, **m.kwargs)), _sample(eager.output))
    assert [g.start for g in replayed.plan.groups if g.kind == "keys"] == [g.start for g in keyed]
    # the chunked keys read the module's weights: loaded in place, the next call computes with the new ones
    other = models.build("wan2.1-1.3b", "medium", seed=1)
    m.module.load_state_dict(other.module.state_dict())
    with torch.no_grad():
        new = _sample(other.module(*m.args, **m.kwargs))
        _close(_sample(replayed(*m.args, **m.kwargs)), new)
    assert float((new - _sample(eager.output)).abs().max()) > 1e-2 * float(new.abs().max())


class _WideBarrier(torch.nn.Module):
    """Self-attention beside a wide tensor no rule slices (a cumulative sum over the tokens): the peak is there."""

    def __init__(self):
        super().__init__()
        self.qkv, self.up = torch.nn.Linear(16, 48), torch.nn.Linear(16, 2048)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return x + a + self.up(x).cumsum(1).mean(-1, keepdim=True)


def test_keys_stay_whole_where_no_attention_holds_the_peak():
    model, x = _WideBarrier().eval(), torch.randn(1, 256, 16)
    gm = capture(model, x)
    assert key_cones(gm)
    plain = pipeline._slice_budget(gm, None, "cpu", True)
    assert "cumsum" in plain[1].timeline.peak_node
    assert pipeline._whole_keys(gm, plain) == set()  # nothing planned a second time
    plan = fxstream.plan(model, x)
    assert not [g for g in plan.groups if g.kind == "keys"]
