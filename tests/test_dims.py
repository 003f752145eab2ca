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


def _run_sliced(n, req, axis, a, b, env):
    """Evaluate node ``n`` on the slices ``req`` asks for, inputs taken from ``env`` (node -> tensor)."""

    def take(x):
        if not isinstance(x, torch.fx.Node):
            return x
        r = req.get(x, WHOLE)
        t = env[x]
        return t if r is WHOLE else t.narrow(r.dim, a * r.unit, (b - a) * r.unit)

    args = torch.fx.node.map_arg(n.args, take)
    kwargs = torch.fx.node.map_arg(n.kwargs, take)
    return n.target(*args, **kwargs)


def _values(gm, inputs):
    env = {}
    for n, x in zip(placeholders(gm), inputs):
        env[n] = x
    for n in gm.graph.nodes:
        if n.op == "call_function":
            env[n] = n.target(*torch.fx.node.map_arg(n.args, env.__getitem__),
                              **torch.fx.node.map_arg(n.kwargs, env.__getitem__))
    return env


# the ops the video transformers added to the table: (op, function, inputs, parallel dims, barrier dims)
_TRANSFORMER_OPS = [
    (aten.rms_norm.default, lambda x, w: F.rms_norm(x, (6,), w), (torch.randn(2, 5, 6), torch.randn(6)), [0, 1], [2]),
    (aten.slice_scatter.default, lambda x, s: aten.slice_scatter(x, s, 2, 0, None, 2),
     (torch.randn(2, 5, 6), torch.randn(2, 5, 3)), [0, 1], [2]),
    (aten.select_scatter.default, lambda x, s: aten.select_scatter(x, s, 1, 2),
     (torch.randn(2, 5, 6), torch.randn(2, 6)), [0, 2], [1]),
    (aten.copy.default, lambda x, s: aten.copy(x, s), (torch.randn(2, 5, 6), torch.randn(5, 1)), [0, 1, 2], []),
    (aten.repeat.default, lambda x: x.repeat(3, 1, 2), (torch.randn(5, 4),), [1], [0, 2]),
    (aten.outer.default, lambda a, b: torch.outer(a, b), (torch.randn(5), torch.randn(4)), [0, 1], []),
    (aten.empty_like.default, lambda x: torch.empty_like(x).fill_(1.0) * x, (torch.randn(3, 4),), [0, 1], []),
    (aten.ge.Tensor, lambda a, b: a >= b, (torch.randn(3, 4), torch.randn(4)), [0, 1], []),
    (aten.pow.Scalar, lambda x: torch.pow(10000.0, x), (torch.randn(3, 4),), [0, 1], []),
]


@pytest.mark.parametrize("case", _TRANSFORMER_OPS, ids=lambda c: str(c[0]))
def test_transformer_ops_slice_exactly_along_their_parallel_dims(case):
    op, fn, inputs, parallel, barriers = case
    gm = graph_of(fn, *inputs)
    env = _values(gm, inputs)
    n = node(gm, op)
    out = env[n]
    for d in parallel:
        req = input_axes(n, SliceAxis(d))
        assert req is not None, f"{op} along dim {d}"
        if op is aten.empty_like.default:
            assert _run_sliced(n, req, d, 1, 2, env).shape == out.narrow(d, 1, 1).shape
            continue
        torch.testing.assert_close(_run_sliced(n, req, d, 1, 2, env), out.narrow(d, 1, 1), rtol=0, atol=0)
    for d in barriers:
        assert input_axes(n, SliceAxis(d)) is None, f"{op} along dim {d}"
