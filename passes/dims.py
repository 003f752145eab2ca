"""Which output dims of each ATen op are parallel, and how a slice of the output maps to its inputs.

Input: an fx node of a captured ATen graph (with ``meta["val"]``) and a :class:`SliceAxis` of its output.
Output: for each tensor input, the slice of it that the output slice needs (a :class:`SliceAxis`, or
``WHOLE``), or ``None`` when the op is not parallel along that axis (a barrier).

Modelled on ``torch.distributed.tensor._ops._view_ops``: shape-only rules, one per kind of op, assigned to ATen
overloads in the op table (:mod:`passes.ops`), and a single entry point, :func:`input_axes`. An op missing from
the table is a barrier, never a guess.

A slice of a group is a contiguous range ``[a, b)`` of the group's logical axis of length ``L``. In a tensor
whose axis is ``SliceAxis(dim, unit)`` the range is the elements ``[a*unit, b*unit)`` of ``dim``, with every
other dim whole; ``size(dim) == L * unit`` for every tensor of a group. ``unit`` lets one group span a merge
like ``(B*T, H*W, C)`` sliced along rows of ``H``: there ``unit`` is ``W``.

Invariant: running an op on input slices chosen by :func:`input_axes` gives exactly the corresponding slice
of its output (up to float reordering inside the op's kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from passes.meta import size_hint


@dataclass(frozen=True)
class SliceAxis:
    """A tensor is sliced along ``dim`` in ranges of whole multiples of ``unit`` elements.

    ``halo`` and ``scale`` describe slices that need extra context rows (a 3x3 convolution along H needs one
    row each side, a 2x upsample doubles the range). The operator groups here never produce them: slicing with
    halos is row streaming (:mod:`passes.rows`), which works out each band's exact row range per node
    (``passes.rows.RowReq``) instead of a fixed halo, because halos add up along a chain and clamp at the
    image edges.
    """

    dim: int
    unit: int = 1
    halo: int = 0
    scale: int = 1


class _Marker:
    """A named singleton standing in for an axis."""

    def __init__(self, name: str, doc: str):
        self._name = name
        self.__doc__ = doc

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self):
        return self._name


WHOLE = _Marker("WHOLE", "The input is needed whole by every slice (weights, broadcast operands, attention keys).")
REDUCED = _Marker("REDUCED", "The output is a reduction over the sliced axis: per-slice partial results combined "
                  "after the loop.")

InputAxes = dict[torch.fx.Node, "SliceAxis | _Marker"]
Rule = Callable[[torch.fx.Node, SliceAxis], "InputAxes | None"]


class SplitReduction(Exception):
    """Raised by a rule when the op reduces over the requested axis but can be split into an exact
    statistics pass and a per-slice apply (GroupNorm whose statistics span the sliced axis)."""


# --------------------------------------------------------------------------------------------------------------
# helpers


def val(node: Any) -> Any:
    """The fake value recorded on a node (or the argument itself when it is not a node)."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def shape(node: Any) -> tuple[int, ...] | None:
    """The node's static sizes (its first element's, for a list); None for a non-tensor, or for sizes that
    depend on the data (``nonzero``'s, in Mochi's attention), which no rule can map. Kept on the node beside the
    value it was read from (the planner asks for it millions of times on a full-size model)."""
    if not isinstance(node, torch.fx.Node):
        return _shape_of(node)
    v = node.meta.get("val")
    kept = node.meta.get(_SHAPE_KEY)
    if kept is None or kept[0] is not v:
        kept = node.meta[_SHAPE_KEY] = (v, _shape_of(v))
    return kept[1]


_SHAPE_KEY = "fxstream_shape"


def _shape_of(v: Any) -> tuple[int, ...] | None:
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
        v = v[0]
    if not isinstance(v, torch.Tensor):
        return None
    sizes = tuple(size_hint(s) for s in v.shape)
    return None if None in sizes else sizes


def _is_tensor_node(x: Any) -> bool:
    return isinstance(x, torch.fx.Node) and isinstance(val(x), torch.Tensor)


def arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def merge(a: InputAxes, b: InputAxes) -> InputAxes | None:
    """Combine requirements on inputs; the same node needed two different ways is a barrier."""
    out = dict(a)
    for k, v in b.items():
        if k in out and out[k] != v:
            return None
        out[k] = v
    return out


def broadcast_operand(x: torch.fx.Node, out_shape: tuple[int, ...], axis: SliceAxis) -> SliceAxis | _Marker:
    """How a broadcasting operand of a pointwise op is sliced when the output is sliced along ``axis``."""
    s = shape(x)
    i = axis.dim - (len(out_shape) - len(s))
    if i < 0 or s[i] == 1:
        return WHOLE
    return SliceAxis(i, axis.unit)


def pointwise(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    out_shape = shape(node)
    req: InputAxes = {}
    for x in node.all_input_nodes:
        if not _is_tensor_node(x):
            continue
        r = broadcast_operand(x, out_shape, axis)
        req = merge(req, {x: r})
        if req is None:
            return None
    return req


def dropout(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    p, train = arg(node, 1, "p", 0.5), arg(node, 2, "train", True)
    if train and p > 0:
        return None  # random masks cannot be reproduced slice by slice
    return pointwise(node, axis)


def same(x_index: int = 0) -> Rule:
    """Output dim ``d`` is input dim ``d`` of one tensor input; other tensor inputs are whole."""

    def rule(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
        req: InputAxes = {}
        for i, x in enumerate(node.args):
            if _is_tensor_node(x):
                req[x] = SliceAxis(axis.dim, axis.unit) if i == x_index else WHOLE
        return req

    return rule


def leading(n_trailing: Callable[[torch.fx.Node], int]) -> Rule:
    """Parallel along every dim but the last ``n_trailing(node)`` ones (linear, layer_norm)."""

    def rule(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
        if axis.dim >= len(shape(node)) - n_trailing(node):
            return None
        return same(0)(node, axis)

    return rule


def kept_dims(dims_arg: int, name: str, keepdim_arg: int | None) -> Rule:
    """Ops that act along some dims (softmax, reductions with dims): parallel along the others."""

    def rule(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
        x = node.args[0]
        in_ndim = len(shape(x))
        dims = arg(node, dims_arg, name)
        dims = [dims] if isinstance(dims, int) else list(dims or range(in_ndim))
        dims = sorted(_norm_dim(d, in_ndim) for d in dims)
        keepdim = bool(arg(node, keepdim_arg, "keepdim", False)) if keepdim_arg is not None else True
        in_dim = axis.dim
        if not keepdim:
            for d in dims:
                if d <= in_dim:
                    in_dim += 1
        if in_dim in dims:
            return None
        return {x: SliceAxis(in_dim, axis.unit)}

    return rule


# --------------------------------------------------------------------------------------------------------------
# matrix products, convolution, attention, normalisation


def linear(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    return leading(lambda n: 1)(node, axis)


def matmul(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """bmm / matmul: batch dims slice both operands; the row dim slices the left one only."""
    a, b = node.args[0], node.args[1]
    out_nd, a_s, b_s = len(shape(node)), shape(a), shape(b)
    if len(a_s) < 2 or len(b_s) < 2:
        return None
    d = axis.dim
    if d == out_nd - 1:
        return None
    if d == out_nd - 2:
        return {a: SliceAxis(len(a_s) - 2, axis.unit), b: WHOLE}
    req: InputAxes = {}
    for x, s in ((a, a_s), (b, b_s)):
        i = d - (out_nd - len(s))
        req[x] = WHOLE if i < 0 or s[i] == 1 else SliceAxis(i, axis.unit)
    return req if a is not b else None


def addmm_like(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """baddbmm(input, b1, b2) / addmm(input, m1, m2): matmul of the last two plus a broadcast addend."""
    bias, a, b = node.args[0], node.args[1], node.args[2]
    out_s = shape(node)
    d = axis.dim
    if d == len(out_s) - 1:
        return None
    req: InputAxes = {a: SliceAxis(d, axis.unit)}
    req[b] = WHOLE if d == len(out_s) - 2 else SliceAxis(d, axis.unit)
    return merge(req, {bias: broadcast_operand(bias, out_s, axis)})


def conv(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """Batch is parallel; a spatial dim is parallel where the kernel is 1 wide with stride 1 and no padding
    (SVD's temporal convolution, kernel (3, 1, 1), is parallel along H and W)."""
    x, w = node.args[0], node.args[1]
    req: InputAxes = {w: WHOLE}
    bias = arg(node, 2, "bias")
    if isinstance(bias, torch.fx.Node):
        req[bias] = WHOLE
    if axis.dim == 0:
        req[x] = SliceAxis(0, axis.unit)
        return req
    if axis.dim == 1:
        return None
    p = _ops.conv_params(node)
    k = axis.dim - 2
    if p is None or k >= len(p["kernel"]):
        return None
    if p["kernel"][k] == 1 and p["stride"][k] == 1 and p["padding"][k] == 0:
        req[x] = SliceAxis(axis.dim, axis.unit)
        return req
    return None


def sdpa(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """scaled_dot_product_attention(q, k, v, mask, ...): batch and heads slice all; query length slices q
    (and the mask's query dim) with keys and values whole."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = arg(node, 3, "attn_mask")
    nd = len(shape(node))
    d = axis.dim
    if d == nd - 1 or arg(node, 5, "is_causal", False):
        return None
    if d == nd - 2:
        req: InputAxes = {q: SliceAxis(d, axis.unit), k: WHOLE, v: WHOLE}
    else:
        req = {}
        for t in (q, k, v):
            r = broadcast_operand(t, shape(node), axis)
            req = merge(req, {t: r})
            if req is None:
                return None
    if isinstance(mask, torch.fx.Node):
        req = merge(req, {mask: broadcast_operand(mask, shape(node), axis)})
    return req


def key_chunked(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """A key-chunked attention ``op(q, *chain_inputs)`` (:mod:`passes.keys`): the query length slices q; what
    the keys and values are made of is read whole."""
    if axis.dim != len(shape(node)) - 2:
        return None
    req: InputAxes = {node.args[0]: SliceAxis(axis.dim, axis.unit)}
    for x in node.args[1:]:
        if isinstance(x, torch.fx.Node):
            if x in req:
                return None
            req[x] = WHOLE
    return req


def group_norm(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """Per-sample statistics: parallel along batch. Along a reduced dim the statistics span slices; that is
    exact only once split into a statistics pass and a per-slice apply (see passes/reductions.py)."""
    if axis.dim == 0:
        return same(0)(node, axis)
    if axis.dim >= 2:
        raise SplitReduction(node.name)
    return None


# --------------------------------------------------------------------------------------------------------------
# layout ops


def view_groups(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input and output dims with equal products (the dims a reshape merges or splits)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi == pj and (gi or gj):
                # absorb trailing size-1 dims so they stay with their group
                while i < len(in_shape) and in_shape[i] == 1 and pi == pj and gi:
                    gi.append(i)
                    i += 1
                while j < len(out_shape) and out_shape[j] == 1 and pi == pj and gj:
                    gj.append(j)
                    j += 1
                break
            if pi <= pj and i < len(in_shape):
                pi *= in_shape[i]
                gi.append(i)
                i += 1
            elif j < len(out_shape):
                pj *= out_shape[j]
                gj.append(j)
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def reshape_input_axis(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: SliceAxis) -> SliceAxis | None:
    """The input axis of a reshape from ``in_shape`` to ``out_shape`` whose output is sliced along ``axis``,
    or None when an output slice is not one contiguous range of a single input dim."""
    groups = view_groups(in_shape, out_shape)
    if groups is None:
        return None
    for gi, gj in groups:
        if axis.dim not in gj:
            continue
        pos = gj.index(axis.dim)
        if math.prod(out_shape[o] for o in gj[:pos]) != 1:
            return None  # outer dims of the merge would turn one slice into several ranges
        flat_unit = axis.unit * math.prod(out_shape[o] for o in gj[pos + 1 :])
        big = [d for d in gi if in_shape[d] != 1]
        if not big:
            return None
        k = big[0]
        inner = math.prod(in_shape[d] for d in gi[gi.index(k) + 1 :])
        if flat_unit % inner:
            return None
        return SliceAxis(k, flat_unit // inner)
    return None


def reshape(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    x = node.args[0]
    a = reshape_input_axis(shape(x), shape(node), axis)
    return None if a is None else {x: a}


def permute(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    x, perm = node.args[0], node.args[1]
    nd = len(shape(node))
    return {x: SliceAxis(_norm_dim(perm[axis.dim], nd), axis.unit)}


def movedim(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """movedim(x, source, destination) with int dims: a permute that moves one dim."""
    x, src, dst = node.args[0], arg(node, 1, "source"), arg(node, 2, "destination")
    nd = len(shape(node))
    src, dst = _norm_dim(src, nd), _norm_dim(dst, nd)
    perm = [i for i in range(nd) if i != src]
    perm.insert(dst, src)
    return {x: SliceAxis(perm[axis.dim], axis.unit)}


def transpose(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    x = node.args[0]
    nd = len(shape(node))
    a, b = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
    d = {a: b, b: a}.get(axis.dim, axis.dim)
    return {x: SliceAxis(d, axis.unit)}


def t(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    return {node.args[0]: SliceAxis(len(shape(node)) - 1 - axis.dim, axis.unit)}


def unsqueeze(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    x = node.args[0]
    d = _norm_dim(node.args[1], len(shape(node)))
    if axis.dim == d:
        return None
    return {x: SliceAxis(axis.dim - (axis.dim > d), axis.unit)}


def squeeze(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    x = node.args[0]
    in_s = shape(x)
    dims = arg(node, 1, "dim")
    if dims is None:
        dims = [i for i, s in enumerate(in_s) if s == 1]
    dims = {_norm_dim(d, len(in_s)) for d in ([dims] if isinstance(dims, int) else dims) if in_s[_norm_dim(d, len(in_s))] == 1}
    kept = [i for i in range(len(in_s)) if i not in dims]
    return {x: SliceAxis(kept[axis.dim], axis.unit)}


def expand(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    x = node.args[0]
    return {x: broadcast_operand(x, shape(node), axis)}


def expand_as(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """expand_as(x, other): ``x`` broadcast to ``other``'s shape; ``other`` gives only its shape, read alike."""
    x, other = node.args[0], node.args[1]
    return {x: broadcast_operand(x, shape(node), axis), other: SliceAxis(axis.dim, axis.unit)}


def select(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    x = node.args[0]
    d = _norm_dim(node.args[1], len(shape(x)))
    return {x: SliceAxis(axis.dim + (axis.dim >= d), axis.unit)}


def slice_rule(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    x = node.args[0]
    in_s = shape(x)
    d = _norm_dim(arg(node, 1, "dim", 0), len(in_s))
    if d == axis.dim:
        start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
        if (start or 0) != 0 or (end is not None and end < in_s[d]) or step != 1:
            return None
    return {x: SliceAxis(axis.dim, axis.unit)}


def split_like(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """chunk / split / split_with_sizes: the output is a list, each element sliced along the list's axis; the
    split dim is a barrier (its elements may differ in size there)."""
    x = node.args[0]
    if _norm_dim(arg(node, 2, "dim", 0), len(shape(x))) == axis.dim:
        return None
    return {x: SliceAxis(axis.dim, axis.unit)}


def unbind(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """unbind: the output is a list of tensors without the unbound dim."""
    x = node.args[0]
    d = _norm_dim(arg(node, 1, "dim", 0), len(shape(x)))
    return {x: SliceAxis(axis.dim + (axis.dim >= d), axis.unit)}


def joined(stacked: bool) -> Rule:
    """cat / stack of a list of tensors: parallel along every dim but the one they are joined on."""

    def rule(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
        tensors = node.args[0]
        nd = len(shape(node))
        d = _norm_dim(arg(node, 1, "dim", 0), nd)
        if d == axis.dim:
            return None
        in_dim = axis.dim - (stacked and axis.dim > d)
        req: InputAxes = {}
        for t in tensors:
            if len(shape(t)) != nd - stacked:
                return None  # legacy empty-tensor cat
            req = merge(req, {t: SliceAxis(in_dim, axis.unit)})
            if req is None:
                return None
        return req

    return rule


def getitem(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    return {node.args[0]: axis}


def upsample(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    if axis.dim >= 2:
        return None  # would need scale != 1 (a row range maps to half as many input rows)
    return {node.args[0]: axis}


def repeat_interleave(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    x = node.args[0]
    d = arg(node, 2, "dim")
    if d is None or not isinstance(arg(node, 1, "repeats"), int):
        return None
    if _norm_dim(d, len(shape(x))) == axis.dim:
        return None
    return {x: SliceAxis(axis.dim, axis.unit)}


def pad(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    x, pads = node.args[0], node.args[1]
    nd = len(shape(node))
    padded = {nd - 1 - i // 2 for i in range(len(pads)) if pads[i] != 0}
    if axis.dim in padded:
        return None
    return {x: SliceAxis(axis.dim, axis.unit)}


def slice_scatter(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """slice_scatter(input, src, dim, ...): the input with a range of ``dim`` replaced by ``src`` (the value of a
    write through a slice): parallel along every other dim, both sliced alike."""
    x, src = node.args[0], node.args[1]
    d = _norm_dim(arg(node, 2, "dim", 0), len(shape(x)))
    if axis.dim == d:
        return None
    return merge({x: SliceAxis(axis.dim, axis.unit)}, {src: SliceAxis(axis.dim, axis.unit)})


def select_scatter(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """select_scatter(input, src, dim, index): ``src`` (without ``dim``) written at one index of ``dim``."""
    x, src = node.args[0], node.args[1]
    d = _norm_dim(node.args[2], len(shape(x)))
    if axis.dim == d:
        return None
    return merge({x: SliceAxis(axis.dim, axis.unit)}, {src: SliceAxis(axis.dim - (axis.dim > d), axis.unit)})


def repeat(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """repeat(x, repeats): a dim repeated once is parallel; dims that ``repeats`` adds in front read x whole."""
    x, repeats = node.args[0], list(node.args[1])
    if repeats[axis.dim] != 1:
        return None
    i = axis.dim - (len(repeats) - len(shape(x)))
    return {x: WHOLE if i < 0 else SliceAxis(i, axis.unit)}


def outer(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """outer(a, b)[i, j] = a[i] * b[j] (the rotary tables' angles)."""
    a, b = node.args[0], node.args[1]
    if a is b:
        return None
    return {a: SliceAxis(0, axis.unit), b: WHOLE} if axis.dim == 0 else {a: WHOLE, b: SliceAxis(0, axis.unit)}


# --------------------------------------------------------------------------------------------------------------
# the custom ops fxstream inserts (passes/reductions.py): GroupNorm statistics and apply


def group_norm_partial(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """Statistics per (sample, group): parallel along batch. Along the normalised dims it is a reduction,
    combined across slices (the op table's ``combine``), which the grouper offers as ``REDUCED``."""
    if axis.dim != 0:
        return None
    return {node.args[0]: SliceAxis(0, axis.unit)}


def group_norm_apply(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """Normalise with complete statistics: parallel along every dim but channels; the statistics are sliced
    with the batch, else read whole."""
    x, stats = node.args[0], node.args[1]
    if axis.dim == 1:
        return None
    req: InputAxes = {x: SliceAxis(axis.dim, axis.unit)}
    req[stats] = SliceAxis(0, axis.unit) if axis.dim == 0 else WHOLE
    for p in node.args[3:5]:
        if isinstance(p, torch.fx.Node):
            req[p] = WHOLE
    return req


# --------------------------------------------------------------------------------------------------------------
# the entry points: the rules are read from the op table (passes/ops.py)


def input_axes(node: torch.fx.Node, axis: SliceAxis) -> InputAxes | None:
    """The input slices that produce the output of ``node`` sliced along ``axis``, or None (barrier).

    Raises :class:`SplitReduction` when the op reduces over ``axis`` but has an exact split form.
    """
    rule = _ops.of(node).dims
    s = shape(node)
    if rule is None or s is None or not 0 <= axis.dim < len(s) or s[axis.dim] % axis.unit:
        return None
    if axis.halo or axis.scale != 1:
        return None
    return rule(node, axis)


# --------------------------------------------------------------------------------------------------------------
# shape arguments: ops that spell out sizes must be told the slice's size


def _set_size(sizes: list[int], d: int, size: int) -> list[int]:
    sizes = list(sizes)
    if sizes[d] != -1:
        sizes[d] = size
    return sizes


def sliced_args(node: torch.fx.Node, axis: SliceAxis, length: int) -> tuple[tuple, dict]:
    """The node's (args, kwargs) for a slice of ``length`` elements along ``axis.dim`` of its output."""
    sizes = _ops.of(node).sizes
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if sizes == "shape":
        args = (args[0], _set_size(args[1], axis.dim, length), *args[2:])
    elif sizes == "unflatten":
        in_dim = _norm_dim(args[1], len(shape(node.args[0])))
        k = axis.dim - in_dim
        if 0 <= k < len(args[2]):
            args = (args[0], args[1], _set_size(args[2], k, length), *args[3:])
    return args, kwargs


from passes import ops as _ops  # noqa: E402  (the table reads the rules above; the rules read the table)
