"""passes.chains: operator groups on small captured graphs."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from blocks import SpatialBlock, TemporalBlock, VideoBlock
from fxstream.capture import capture
from passes.chains import group_operators
from passes.dims import REDUCED, SliceAxis
from passes.reductions import APPLY_OP, PARTIAL_OP

aten = torch.ops.aten


def test_spatial_block_is_one_group_along_frames():
    gm = capture(SpatialBlock(), torch.randn(6, 8, 5, 5))
    gm, groups, _ = group_operators(gm)
    convs = [n for n in gm.graph.nodes if n.target is aten.conv2d.default]
    group = next(g for g in groups if convs[0] in g.nodes)
    assert all(c in group.nodes for c in convs)
    assert group.length == 6 and group.axes[convs[0]] == SliceAxis(0)
    assert group.kind == "spatial"


def test_temporal_block_groups_along_rows_with_split_group_norms_in_passes():
    gm = capture(TemporalBlock(), torch.randn(1, 8, 3, 6, 5))
    gm, groups, _ = group_operators(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert aten.group_norm.default not in targets  # both norms span (T, H, W): split
    convs = [n for n in gm.graph.nodes if n.target is aten.conv3d.default]
    group = next(g for g in groups if convs[1] in g.nodes)
    assert convs[0] in group.nodes  # one group, recomputing conv1 in a later pass
    assert group.axes[convs[1]].dim in (3, 4)
    partials = [n for n in group.nodes if n.target is PARTIAL_OP]
    assert partials and all(group.axes[p] is REDUCED for p in partials)
    assert group.num_passes >= 2
    applies = [n for n in group.nodes if n.target is APPLY_OP]
    assert max(group.passes[a] for a in applies) == group.num_passes - 1


@pytest.mark.parametrize("block", ["temporal", "spatial"])
def test_grouping_never_changes_its_input(block):
    """Grouping rewrites (GroupNorms split, views handed out of a group redone on their base) only a copy,
    which it returns with the groups."""
    module, x = (TemporalBlock(), torch.randn(1, 8, 3, 6, 5)) if block == "temporal" else \
        (SpatialBlock(), torch.randn(6, 8, 5, 5))
    gm = capture(module, x)
    before = [(n.name, n.target, n.args) for n in gm.graph.nodes]
    grouped, groups, split = group_operators(gm)
    assert [(n.name, n.target, n.args) for n in gm.graph.nodes] == before
    assert grouped is not gm and groups
    assert all(n.graph is grouped.graph for g in groups for n in g.nodes)
    if block == "temporal":
        assert len(split) == 2 and aten.group_norm.default in [t for _, t, _ in before]
        assert not {n.name for n in grouped.graph.nodes if n.target is aten.group_norm.default} & set(split)
    else:
        assert split == []


def test_axis_change_between_frames_and_pixels_is_a_group_boundary():
    gm = capture(VideoBlock(), torch.randn(6, 8, 5, 5))
    gm, groups, _ = group_operators(gm)
    conv2d = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    conv3d = next(n for n in gm.graph.nodes if n.target is aten.conv3d.default)
    g2 = next(g for g in groups if conv2d in g.nodes)
    g3 = next(g for g in groups if conv3d in g.nodes)
    assert g2 is not g3
    assert g2.axes[conv2d] == SliceAxis(0) and g2.length == 6
    assert g3.axes[conv3d].dim in (3, 4)
    assert g3.kind in ("temporal", "spatial", "other")


def test_groups_are_convex_so_outlining_makes_no_cycle():
    class Diamond(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            side = torch.cumsum(h, 0)  # no rule: outside every group, between two group nodes
            return self.b(h) + side

    gm = capture(Diamond(), torch.randn(8, 4))
    gm, groups, _ = group_operators(gm)
    cumsum = next(n for n in gm.graph.nodes if n.target is aten.cumsum.default)
    for g in groups:
        members = set(g.nodes)
        # no path leaves the group and comes back: cumsum's producer and consumer are not both members
        assert not ({p for p in cumsum.all_input_nodes} & members and set(cumsum.users) & members)
    assert all(cumsum not in g.nodes for g in groups)


def test_group_boundary_lists_inputs_and_outputs():
    gm = capture(SpatialBlock(), torch.randn(6, 8, 5, 5))
    gm, groups, _ = group_operators(gm)
    g = max(groups, key=lambda g: len(g.nodes))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("x"))
    assert g.inputs[x] == SliceAxis(0)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert any(o in out.all_input_nodes or any(u.op == "output" for u in o.users) for o in g.outputs)


# -- list-valued nodes (unbind; capture turns the parts of a split / chunk into slices) --------------------------


class _RopeSplit(nn.Module):
    """A tensor unbound into parts along a dim after the tokens, each part used per token."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.out = nn.Linear(4, 4)

    def forward(self, x):  # (B, L, 16)
        a, b, c, d = self.lin(x).unflatten(-1, (4, 4)).unbind(2)
        return self.out(a) * 2, torch.cat([b, c, d], -1).sin()


class _Modulation(nn.Module):
    """Timestep modulation: a (1, 6, D) table chunked into six, read by per-token ops and handed out."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 48)

    def forward(self, x, temb):  # (1, L, 8), (1, 8)
        mods = self.lin(temb).unflatten(1, (6, -1)).unbind(1)
        y = x * (1 + mods[0]) + mods[1]
        return y * mods[2], mods[5]


def _list_nodes(gm):
    return [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), (list, tuple)) and n.op == "call_function"]


def test_a_list_never_crosses_a_group_boundary():
    for module, args in ((_RopeSplit(), (torch.randn(2, 12, 16),)), (_Modulation(), (torch.randn(1, 12, 8), torch.randn(1, 8)))):
        gm = capture(module.eval(), *args)
        gm, groups, _ = group_operators(gm)
        assert _list_nodes(gm)
        for g in groups:
            members = set(g.nodes)
            assert not any(isinstance(p.meta["val"], (list, tuple)) for p in g.inputs), g.name
            assert not any(isinstance(o.meta["val"], (list, tuple)) for o in g.outputs), g.name
            for n in g.nodes:  # a list in a group has all its getitems with it
                if isinstance(n.meta["val"], (list, tuple)):
                    assert set(n.users) <= members


def test_split_is_sliced_along_another_dim_never_the_split_dim():
    gm = capture(_RopeSplit().eval(), torch.randn(2, 12, 16))
    gm, groups, _ = group_operators(gm)
    split = next(n for n in gm.graph.nodes if n.target is aten.unbind.int)
    group = next(g for g in groups if split in g.nodes)
    assert group.axes[split].dim != 2  # the unbound dim is a barrier
    for item in split.users:  # each element carries the list's axis
        assert group.axes[item] == group.axes[split]


def test_list_valued_groups_run_exactly_sliced():
    import fxstream

    for module, args in ((_RopeSplit(), (torch.randn(2, 12, 16),)), (_Modulation(), (torch.randn(1, 12, 8), torch.randn(1, 8)))):
        module.eval().requires_grad_(False)
        ref = module(*args)
        for kw in (dict(chunks=3), dict()):
            out = fxstream.compile(module, **kw)(*args)
            for o, r in zip(out, ref):
                torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


# -- convexity of merged groups --------------------------------------------------------------------------------


def test_groups_that_would_form_a_cycle_together_are_dissolved():
    """Two groups, each convex, where A feeds B through an outside node and B feeds A through another: outlined
    together they form a cycle. The net dissolves one of them (run whole, exact)."""
    from passes.chains import OperatorGroup, _dissolve_cycles

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    a1 = graph.call_function(torch.sin, (x,))
    b1 = graph.call_function(torch.exp, (x,))
    o1 = graph.call_function(torch.cos, (a1,))  # outside: A -> B
    o2 = graph.call_function(torch.tanh, (b1,))  # outside: B -> A
    a2 = graph.call_function(torch.neg, (o2,))
    b2 = graph.call_function(torch.abs, (o1,))
    graph.output((a1, a2, b1, b2))
    gm = torch.fx.GraphModule(nn.Module(), graph)

    def group(name, nodes):
        return OperatorGroup(name=name, kind="other", length=4, nodes=nodes, axes={n: SliceAxis(0) for n in nodes})

    a, b = group("a", [a1, a2]), group("b", [b1, b2])
    kept = _dissolve_cycles(gm, [a, b])
    assert len(kept) == 1
    assert _dissolve_cycles(gm, [a]) == [a] and _dissolve_cycles(gm, [b]) == [b]  # each alone is convex


def test_merge_check_sees_paths_through_other_groups():
    """Merging is checked on the graph with groups contracted: a path that leaves through a third group (one
    call once outlined) and comes back is a cycle, though no node-level path leaves and comes back."""
    from passes.chains import _Grouper

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    t1 = graph.call_function(torch.sin, (x,))
    g1 = graph.call_function(torch.exp, (t1,))  # only feeds the output
    g2 = graph.call_function(torch.tanh, (x,))
    t2 = graph.call_function(torch.add, (t1, g2))
    graph.output((t2, g1))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    grouper = _Grouper(gm)
    assert grouper._convex({t1, t2})  # g1 and g2 each stand alone: nothing leaves {t1, t2} and comes back
    grouper.members[1] = [g1, g2]
    grouper.group_of.update({g1: 1, g2: 1})
    assert not grouper._convex({t1, t2})  # t1 -> group {g1, g2} -> t2


def test_the_walk_never_joins_two_groups_into_a_cycle():
    """A node may not join a group when a group it reads from already depends on that group."""
    from passes.chains import _Grouper

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    n = graph.call_function(torch.sin, (x,))
    graph.output(n)
    grouper = _Grouper(torch.fx.GraphModule(nn.Module(), graph))
    grouper._depend(1, 1 << 0)  # group 1 reads group 0
    grouper.anc[n] = 1 << 1  # n reads a member of group 1
    assert not grouper._acyclic_join(n, 0)  # joining group 0 would make 0 -> 1 -> 0
    assert grouper._acyclic_join(n, 2)
    grouper._depend(2, 1 << 1)  # group 2 reads group 1, so transitively group 0
    grouper.anc[n] = 1 << 2
    assert not grouper._acyclic_join(n, 0)


def test_acyclic_check_agrees_with_networkx_on_random_graphs():
    import random

    import networkx as nx

    from passes.chains import _acyclic

    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 12)
        edges = {(rng.randrange(n), rng.randrange(n)) for _ in range(rng.randint(0, 20))}
        edges = {(a, b) for a, b in edges if a != b}
        succ = {}
        for a, b in edges:
            succ.setdefault(a, set()).add(b)
        assert _acyclic(succ) == nx.is_directed_acyclic_graph(nx.DiGraph(list(edges))), (trial, edges)
