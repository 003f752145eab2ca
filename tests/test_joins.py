"""Joined sequences (passes/joins.py, passes/slicing.write_into_joins): per-token ops moved through the ``cat`` of a
joint text + video sequence, and sliced groups writing their parts straight into the join an attention reads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxstream
from fxstream.capture import capture
from fxstream.runtime.sliced import SlicedCall, join_into
from passes import ops
from passes.chains import group_operators
from passes.joins import WHOLE_JOIN, split_joins
from passes.meta import storage_key
from passes.slicing import copy_graph_module

aten = torch.ops.aten
VIDEO, TEXT, WIDTH, HEADS = 96, 8, 16, 4  # the tokens are the longest dim, as in the models


class JointBlock(nn.Module):
    """A single-stream block in HunyuanVideo's shape: the prompt joined after the video tokens, a norm, an
    attention over the joint sequence beside a 4x-wide MLP, one projection of both, a residual, split again."""

    def __init__(self, rotate: bool = False, turn_video: bool = False):
        super().__init__()
        self.turn_video = turn_video
        self.norm = nn.LayerNorm(WIDTH)
        self.qkv = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.mlp = nn.Linear(WIDTH, 4 * WIDTH)
        self.out = nn.Linear(5 * WIDTH, WIDTH)
        self.rotate = rotate

    def forward(self, video: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([video, text], dim=1)
        n = self.norm(h)
        if self.turn_video:  # HunyuanVideo turns the video tokens' queries and keys only, then joins the prompt's
            q, k, v = (p(n).unflatten(2, (HEADS, -1)) for p in self.qkv)
            q, k = (torch.cat([x[:, :VIDEO] * 0.5, x[:, VIDEO:]], dim=1) for x in (q, k))
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        else:
            q, k, v = (p(n).unflatten(2, (HEADS, -1)).transpose(1, 2) for p in self.qkv)
        if self.rotate:  # CogVideoX writes its rotated video tokens back into the joined queries and keys
            q = q.clone()
            k = k.clone()
            q[:, :, :VIDEO] = q[:, :, :VIDEO].flip(-1) * 0.5
            k[:, :, :VIDEO] = k[:, :, :VIDEO].flip(-1) * 0.5
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        h = h + self.out(torch.cat([a, F.gelu(self.mlp(n))], dim=2))
        return h[:, :VIDEO], h[:, VIDEO:]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, VIDEO, WIDTH, generator=g), torch.randn(2, TEXT, WIDTH, generator=g)


def _split(module: nn.Module):
    gm = capture(module, *_inputs())
    work = copy_graph_module(gm)[0]
    return gm, work, split_joins(work)


def test_per_token_ops_move_through_the_join_and_the_graph_computes_the_same():
    module = JointBlock().eval()
    gm, work, moved = _split(module)
    assert moved > 0
    joins = [n for n in work.graph.nodes
             if n.target is aten.cat.default and n.meta["val"].shape[n.args[1]] == VIDEO + TEXT]
    sdpas = [n for n in work.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    # the attention runs once for the video's queries and once for the prompt's, over the same joined keys
    assert len(sdpas) == 2 and {tuple(n.meta["val"].shape)[2] for n in sdpas} == {VIDEO, TEXT}
    assert sdpas[0].args[1] is sdpas[1].args[1]
    # what the join is read by now: the attention's keys and values only (through views), never a norm or linear
    for c in joins:
        for u in c.users:
            assert u.target not in (aten.layer_norm.default, aten.linear.default), u
    marked = [n for n in work.graph.nodes if n.meta.get(WHOLE_JOIN)]
    assert len(marked) == 2  # the keys' and the values' joins
    with torch.no_grad():
        want, got = module(*_inputs()), work(*_inputs())
    for w, g in zip(want, got):
        assert float((w - g).abs().max()) <= 1e-5 * float(w.abs().max())


def test_views_of_a_part_are_views_of_its_storage_after_the_rewrite():
    """A view made of a slice of the join (the prompt's keys) reads the part itself once the slice is resolved:
    its fake value must be a view of the part's storage, or the memory model counts the whole join for it."""
    module = JointBlock(turn_video=True).eval()
    gm, work, moved = _split(module)
    checked = 0
    for n in work.graph.nodes:
        if n.op == "call_function" and ops.of(n).alias is ops.Alias.VIEW and isinstance(n.args[0], torch.fx.Node):
            assert storage_key(n.meta["val"]) == storage_key(n.args[0].meta["val"]), n
            checked += 1
    assert checked
    with torch.no_grad():
        want, got = module(*_inputs()), work(*_inputs())
    for w, g in zip(want, got):
        assert float((w - g).abs().max()) <= 1e-5 * float(w.abs().max())


def test_a_part_written_back_into_the_join_replaces_that_part():
    module = JointBlock(rotate=True).eval()
    gm, work, moved = _split(module)
    assert not any(n.target is aten.slice_scatter.default for n in work.graph.nodes)
    assert any(n.target is aten.slice_scatter.default for n in gm.graph.nodes)
    sdpas = [n for n in work.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(sdpas) == 2
    with torch.no_grad():
        want, got = module(*_inputs()), work(*_inputs())
    for w, g in zip(want, got):
        assert float((w - g).abs().max()) <= 1e-5 * float(w.abs().max())


def test_a_join_of_channels_is_left_alone():
    class Channels(nn.Module):
        def forward(self, a, b):
            return torch.relu(torch.cat([a, b], dim=-1)) * 2

    gm = capture(Channels(), torch.randn(1, 64, 8), torch.randn(1, 64, 4))
    work = copy_graph_module(gm)[0]
    assert split_joins(work) == 0
    # a timestep embedding's sin and cos, joined along its features (its longest dim, but its last)
    gm = capture(Channels(), torch.randn(2, 32), torch.randn(2, 32))
    work = copy_graph_module(gm)[0]
    assert split_joins(work) == 0


def test_the_attentions_video_queries_are_sliced_with_the_mlp_and_the_keys_written_into_their_join():
    module = JointBlock().eval()
    grouped, groups, _ = group_operators(capture(module, *_inputs()))
    loop = [g for g in groups if any(n.target is aten.scaled_dot_product_attention.default for n in g.nodes)
            and any(n.target is aten.gelu.default for n in g.nodes) and g.length == VIDEO]
    assert len(loop) == 1  # the video's queries, its MLP, the projection: one loop over the video tokens
    compiled = fxstream.compile(module)
    with torch.no_grad():
        eager = fxstream.measure(module, *_inputs())
        compiled(*_inputs())
        got = fxstream.measure(compiled, *_inputs())
    for w, g in zip(eager.output, got.output):
        assert float((w - g).abs().max()) <= 1e-5 * float(w.abs().max())
    gm = compiled._fx_last.graph_module
    joins = [n for n in gm.graph.nodes if n.target is join_into]
    assert joins, "the keys' and values' joins are made in place"
    written = [s for m in gm.modules() if isinstance(m, SlicedCall) for s in m.slot_specs if s.dest is not None]
    assert written
    predicted = compiled.plan.predicted_activation_peak_bytes
    assert abs(got.activation_peak_bytes - predicted) <= 0.10 * predicted, (got.activation_peak_bytes, predicted)
    assert got.activation_peak_bytes < eager.activation_peak_bytes


def test_join_into_copies_only_the_parts_not_written_in_place():
    buffer = torch.zeros(1, 6, 4)
    written = buffer.narrow(1, 0, 4).as_strided((1, 4, 4), (999, 4, 1))  # the range, a size-1 dim's stride aside
    written.copy_(torch.ones(1, 4, 4))
    other = torch.full((1, 2, 4), 2.0)
    out = join_into(buffer, [written, other], 1)
    assert out is buffer
    assert torch.equal(out, torch.cat([torch.ones(1, 4, 4), other], 1))
