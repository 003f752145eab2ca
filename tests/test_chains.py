"""passes.chains: operator groups on small captured graphs."""

from __future__ import annotations

import torch
from torch import nn

from blocks import SpatialBlock, TemporalBlock, VideoBlock
from fxstream.capture import capture
from passes.chains import find_groups
from passes.dims import REDUCED, SliceAxis
from passes.reductions import APPLY_OP, PARTIAL_OP

aten = torch.ops.aten


def test_spatial_block_is_one_group_along_frames():
    gm = capture(SpatialBlock(), torch.randn(6, 8, 5, 5))
    groups = find_groups(gm)
    convs = [n for n in gm.graph.nodes if n.target is aten.conv2d.default]
    group = next(g for g in groups if convs[0] in g.nodes)
    assert all(c in group.nodes for c in convs)
    assert group.length == 6 and group.axes[convs[0]] == SliceAxis(0)
    assert group.kind == "spatial"


def test_temporal_block_groups_along_rows_with_split_group_norms_in_passes():
    gm = capture(TemporalBlock(), torch.randn(1, 8, 3, 6, 5))
    groups = find_groups(gm)
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


def test_axis_change_between_frames_and_pixels_is_a_group_boundary():
    gm = capture(VideoBlock(), torch.randn(6, 8, 5, 5))
    groups = find_groups(gm)
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
    groups = find_groups(gm)
    cumsum = next(n for n in gm.graph.nodes if n.target is aten.cumsum.default)
    for g in groups:
        members = set(g.nodes)
        # no path leaves the group and comes back: cumsum's producer and consumer are not both members
        assert not ({p for p in cumsum.all_input_nodes} & members and set(cumsum.users) & members)
    assert all(cumsum not in g.nodes for g in groups)


def test_group_boundary_lists_inputs_and_outputs():
    gm = capture(SpatialBlock(), torch.randn(6, 8, 5, 5))
    groups = find_groups(gm)
    g = max(groups, key=lambda g: len(g.nodes))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("x"))
    assert g.inputs[x] == SliceAxis(0)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert any(o in out.all_input_nodes or any(u.op == "output" for u in o.users) for o in g.outputs)
