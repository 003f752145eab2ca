"""passes.dims: the rule table, on small captured graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxstream.capture import capture
from passes.dims import WHOLE, SliceAxis, SplitReduction, input_axes, reshape_input_axis, sliced_args

aten = torch.ops.aten


def graph_of(fn, *args):
    class M(nn.Module):
        def forward(self, *a):
            return fn(*a)

    return capture(M(), *args)


def node(gm, target):
    return next(n for n in gm.graph.nodes if n.target is target)


def placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def test_pointwise_broadcast_operand_is_whole_along_broadcast_dims():
    gm = graph_of(lambda x, b: x + b, torch.randn(4, 3, 5), torch.randn(3, 1))
    x, b = placeholders(gm)
    add = node(gm, aten.add.Tensor)
    assert input_axes(add, SliceAxis(0)) == {x: SliceAxis(0), b: WHOLE}
    assert input_axes(add, SliceAxis(1)) == {x: SliceAxis(1), b: SliceAxis(0)}
    assert input_axes(add, SliceAxis(2)) == {x: SliceAxis(2), b: WHOLE}


def test_linear_is_parallel_along_leading_dims_only():
    lin = nn.Linear(5, 7)
    gm = capture(lin, torch.randn(4, 3, 5))
    n = node(gm, aten.linear.default)
    req = input_axes(n, SliceAxis(1))
    assert req[n.args[0]] == SliceAxis(1)
    assert req[n.args[1]] is WHOLE and req[n.args[2]] is WHOLE
    assert input_axes(n, SliceAxis(2)) is None


def test_conv3d_is_parallel_along_unit_kernel_dims_only():
    conv = nn.Conv3d(4, 4, kernel_size=(3, 1, 1), padding=(1, 0, 0))
    gm = capture(conv, torch.randn(2, 4, 5, 6, 7))
    n = node(gm, aten.conv3d.default)
    assert input_axes(n, SliceAxis(3))[n.args[0]] == SliceAxis(3)  # H: kernel 1
    assert input_axes(n, SliceAxis(4))[n.args[0]] == SliceAxis(4)  # W: kernel 1
    assert input_axes(n, SliceAxis(2)) is None  # T: kernel 3
    assert input_axes(n, SliceAxis(1)) is None  # output channels mix all inputs


def test_conv2d_3x3_is_a_barrier_along_rows_without_halo():
    gm = capture(nn.Conv2d(3, 3, 3, padding=1), torch.randn(2, 3, 8, 8))
    n = node(gm, aten.conv2d.default)
    assert input_axes(n, SliceAxis(0))[n.args[0]] == SliceAxis(0)
    assert input_axes(n, SliceAxis(2)) is None


def test_sdpa_query_slices_keep_keys_and_values_whole():
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    gm = graph_of(F.scaled_dot_product_attention, q, k, v)
    qn, kn, vn = placeholders(gm)
    n = node(gm, aten.scaled_dot_product_attention.default)
    assert input_axes(n, SliceAxis(2)) == {qn: SliceAxis(2), kn: WHOLE, vn: WHOLE}
    assert input_axes(n, SliceAxis(0)) == {qn: SliceAxis(0), kn: SliceAxis(0), vn: SliceAxis(0)}
    assert input_axes(n, SliceAxis(3)) is None


def test_group_norm_over_the_sliced_axis_asks_for_a_split():
    gm = capture(nn.GroupNorm(2, 4), torch.randn(2, 4, 3, 5, 5))
    n = node(gm, aten.group_norm.default)
    assert input_axes(n, SliceAxis(0))[n.args[0]] == SliceAxis(0)
    with pytest.raises(SplitReduction):
        input_axes(n, SliceAxis(3))
    assert input_axes(n, SliceAxis(1)) is None


@pytest.mark.parametrize(
    "in_shape, out_shape, axis, expected",
    [
        ((6, 3, 5), (2, 3, 3, 5), SliceAxis(0), SliceAxis(0, 3)),  # (B*T) -> (B, T): B needs whole T's
        ((2, 3, 3, 5), (6, 3, 5), SliceAxis(0), None),  # (B, T) -> B*T: one slice would span two B's
        ((2, 3, 3, 5), (6, 3, 5), SliceAxis(0, 3), SliceAxis(0, 1)),
        ((4, 6, 8, 5), (4, 48, 5), SliceAxis(1, 8), SliceAxis(1, 1)),  # rows of H inside H*W
        ((4, 6, 8, 5), (4, 48, 5), SliceAxis(1, 4), None),  # half rows: not a range of H
        ((2, 48, 3, 5), (96, 3, 5), SliceAxis(0), None),  # (B, pixels) merged with B outer
        ((1, 48, 3, 5), (48, 3, 5), SliceAxis(0), SliceAxis(1, 1)),  # size-1 outer dims are free
    ],
)
def test_reshape_maps_a_slice_only_when_it_stays_one_range(in_shape, out_shape, axis, expected):
    assert reshape_input_axis(in_shape, out_shape, axis) == expected


def test_permute_and_transpose_move_the_axis():
    gm = graph_of(lambda x: x.permute(0, 2, 1, 3).transpose(0, 3), torch.randn(2, 3, 4, 5))
    p = node(gm, aten.permute.default)
    t = node(gm, aten.transpose.int)
    assert input_axes(p, SliceAxis(1)) == {p.args[0]: SliceAxis(2)}
    assert input_axes(t, SliceAxis(0)) == {t.args[0]: SliceAxis(3)}


def test_op_without_a_rule_is_a_barrier():
    gm = graph_of(lambda x: torch.cumsum(x, 1), torch.randn(4, 5))
    n = node(gm, aten.cumsum.default)
    assert input_axes(n, SliceAxis(0)) is None


def test_shape_arguments_get_the_slice_size():
    gm = graph_of(lambda x: x.reshape(2, 3, 4, 5), torch.randn(6, 4, 5))
    n = node(gm, aten.reshape.default) if any(m.target is aten.reshape.default for m in gm.graph.nodes) \
        else node(gm, aten.view.default)
    args, _ = sliced_args(n, SliceAxis(0, 3), 1)
    assert list(args[1]) == [1, 3, 4, 5]


def test_cat_and_stack_are_parallel_except_along_the_joined_dim():
    gm = graph_of(lambda a, b: (torch.cat([a, b], 1), torch.stack([a, b], 1)), torch.randn(4, 3, 5),
                  torch.randn(4, 3, 5))
    a, b = placeholders(gm)
    cat, stack = node(gm, aten.cat.default), node(gm, aten.stack.default)
    assert input_axes(cat, SliceAxis(2)) == {a: SliceAxis(2), b: SliceAxis(2)}
    assert input_axes(cat, SliceAxis(1)) is None
    assert input_axes(stack, SliceAxis(2)) == {a: SliceAxis(1), b: SliceAxis(1)}
    assert input_axes(stack, SliceAxis(1)) is None
