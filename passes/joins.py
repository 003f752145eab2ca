"""Joined sequences split: per-token ops moved through the ``cat`` that joins two parts of a sequence.

Input: a GraphModule (a copy the caller owns). Output (:func:`split_joins`, which rewrites it): every op that is
parallel along the dim a ``cat`` joins on, and reads the ``cat``, runs on each part instead, and its results are
joined after it: ``op(cat([a, b])) -> cat([op(a), op(b)])``; a slice of a ``cat`` that is one of its parts is that
part, and a ``slice_scatter`` that writes one part back is the join with the new part. Repeated to a fixed point,
the join moves down each chain until an op that needs the whole sequence (the keys and values of an attention) or
is not parallel along it. A join an attention reads whole is marked (``WHOLE_JOIN``) for the grouper and the
slicer.

Why: a joint text + video sequence (HunyuanVideo's blocks, CogVideoX's attentions) joins a short
prompt to tens of thousands of video tokens along the token axis, and an operator group's slices are ranges of
one axis of equal length in every tensor (:mod:`passes.dims`): no group can slice the joined sequence, so the
per-token chains around its attention (norms, projections, the feed-forward, the attention's queries) ran whole.
Split, the video part is a chain of its own that the grouper slices along its tokens like any other, and the
prompt's part runs whole beside it.

Exact: each op computes the same elements, on fewer rows at a time (float reordering inside a kernel at most).
Which ops: those whose slice rule (:mod:`passes.dims`) maps one output dim, of the joined length, to the join's
dim with unit 1; their other inputs are read whole where the rule says so, else the matching parts (a join of the
same lengths, or a view of each part's range). Which joins: those along the longest dim of their value, not its last (a
sequence, not the channels or features a ``cat`` also joins), of at least two parts.
"""

from __future__ import annotations

import torch
import torch.fx

from passes import ops
from passes.dims import WHOLE, SliceAxis, SplitReduction, input_axes, shape, sliced_args, val
from passes.meta import fake_value

JOINS = (ops.JOIN, ops.CONCATENATE)


def join_dim(node: torch.fx.Node) -> int:
    """The dim a ``cat`` node joins along, made non-negative."""
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return d + val(node).dim() if d < 0 else d


def _parts(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The parts of a join this pass moves ops through, or None."""
    if node.op != "call_function" or node.target not in JOINS or not isinstance(val(node), torch.Tensor):
        return None
    parts, s = node.args[0], shape(node)
    if s is None or not isinstance(parts, (list, tuple)) or len(parts) < 2:
        return None
    if not all(isinstance(p, torch.fx.Node) and isinstance(val(p), torch.Tensor) and shape(p) is not None
               and len(shape(p)) == len(s) and shape(p)[join_dim(node)] > 0 for p in parts):
        return None  # the legacy empty-tensor cat, or a part of no length
    d = join_dim(node)
    if s[d] < max(s) or d == len(s) - 1:
        return None  # channels or features joined (a timestep embedding's sin and cos): not a sequence
    return list(parts)


def _lengths(node: torch.fx.Node) -> list[int]:
    return [shape(p)[join_dim(node)] for p in node.args[0]]


class _Rewriter:
    def __init__(self, gm: torch.fx.GraphModule):
        self.graph = gm.graph
        self.made: list[torch.fx.Node] = []

    def node(self, target, args, kwargs, like: torch.fx.Node) -> torch.fx.Node:
        n = self.graph.call_function(target, tuple(args), dict(kwargs))
        self.made.append(n)
        n.meta = {k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        n.meta["val"] = fake_value(target, n.args, n.kwargs)
        return n

    def undo(self) -> None:
        for n in reversed(self.made):
            self.graph.erase_node(n)
        self.made.clear()


def _slice_of(c: torch.fx.Node, u: torch.fx.Node, rw: _Rewriter) -> torch.fx.Node | None:
    """``u``, a slice of the join ``c`` along its dim, as a part, a slice of a part, or a join of whole parts."""
    d, n = join_dim(c), shape(c)[join_dim(c)]
    args = list(u.args) + [None] * (5 - len(u.args))
    dim, start, end, step = (args[1] or 0), args[2], args[3], (args[4] if args[4] is not None else 1)
    dim = dim + len(shape(c)) if dim < 0 else dim
    if dim != d or step != 1:
        return None
    start = 0 if start is None else (start + n if start < 0 else start)
    end = n if end is None else (end + n if end < 0 else end)
    start, end = max(0, min(start, n)), max(0, min(end, n))
    offsets, o = [], 0
    for length in _lengths(c):
        offsets.append((o, o + length))
        o += length
    for p, (a, b) in zip(c.args[0], offsets):
        if (a, b) == (start, end):
            return p
        if a <= start and end <= b and start < end:
            return rw.node(ops.SLICE, (p, d, start - a, end - a), {}, u)
    whole = [p for p, (a, b) in zip(c.args[0], offsets) if start <= a and b <= end]
    if len(whole) >= 2 and offsets[c.args[0].index(whole[0])][0] == start \
            and offsets[c.args[0].index(whole[-1])][1] == end:
        return rw.node(c.target, ([*whole], d), {}, u)
    return None


def _scatter_into(c: torch.fx.Node, u: torch.fx.Node, rw: _Rewriter) -> torch.fx.Node | None:
    """``u = slice_scatter(c, src, dim, start, end)`` that replaces one part of the join ``c`` (CogVideoX writes
    its rotated video tokens back into the joined queries and keys): the join with ``src`` for that part."""
    d, n = join_dim(c), shape(c)[join_dim(c)]
    args = list(u.args) + [None] * (6 - len(u.args))
    src, dim, start, end, step = args[1], args[2] or 0, args[3], args[4], args[5] if args[5] is not None else 1
    dim = dim + len(shape(c)) if dim < 0 else dim
    if dim != d or step != 1 or not isinstance(src, torch.fx.Node):
        return None
    start = 0 if start is None else (start + n if start < 0 else start)
    end = n if end is None else (end + n if end < 0 else end)
    offset = 0
    for i, (p, length) in enumerate(zip(c.args[0], _lengths(c))):
        if (offset, offset + length) == (start, min(end, n)) and shape(src) == shape(p) \
                and val(src).dtype == val(p).dtype:
            parts = list(c.args[0])
            parts[i] = src
            return rw.node(c.target, (parts, d), {}, u)
        offset += length
    return None


def _through(c: torch.fx.Node, u: torch.fx.Node, rw: _Rewriter) -> torch.fx.Node | None:
    """``u`` run on each part of the join ``c``, joined after it; None where it cannot be (nothing changed)."""
    if u.op != "call_function" or not isinstance(val(u), torch.Tensor) or shape(u) is None:
        return None
    if u.target is ops.SLICE and u.args[0] is c:
        return _slice_of(c, u, rw)
    if u.target is ops.SLICE_SCATTER and u.args[0] is c and u.args[1] is not c:
        return _scatter_into(c, u, rw)
    d, n = join_dim(c), shape(c)[join_dim(c)]
    lengths = _lengths(c)
    # the output dim that is the join's dim, element for element
    found = None
    for e in sorted(range(len(shape(u))), key=lambda e: e != d):
        if shape(u)[e] != n:
            continue
        try:
            req = input_axes(u, SliceAxis(e, 1))
        except SplitReduction:
            req = None
        if req is not None and req.get(c) == SliceAxis(d, 1):
            found = e, req
            break
    if found is None:
        return None
    e, req = found
    # each input's parts: the join's own, another join's of the same lengths, views of a whole tensor's ranges, or
    # the input itself where every part reads it whole
    per_input: dict[torch.fx.Node, list[torch.fx.Node] | None] = {}
    for x, r in req.items():
        if r is WHOLE:
            per_input[x] = None
        elif isinstance(r, SliceAxis) and r.unit == 1 and not r.halo and r.scale == 1 and shape(x)[r.dim] == n:
            if x is c or (_parts(x) is not None and join_dim(x) == r.dim and _lengths(x) == lengths):
                per_input[x] = list(x.args[0])
            else:
                per_input[x] = "view", r.dim
        else:
            return None
    out = []
    offset = 0
    for i, length in enumerate(lengths):
        args, kwargs = sliced_args(u, SliceAxis(e, 1), length)
        mapping = {}
        for x, parts in per_input.items():
            if parts is None:
                mapping[x] = x
            elif isinstance(parts, tuple):
                mapping[x] = rw.node(ops.SLICE, (x, parts[1], offset, offset + length), {}, u)
            else:
                mapping[x] = parts[i]
        args, kwargs = torch.fx.node.map_arg((args, kwargs), lambda a: mapping.get(a, a))
        part = rw.node(u.target, args, kwargs, u)
        if shape(part) is None or shape(part)[e] != length:
            return None
        out.append(part)
        offset += length
    joined = rw.node(ops.JOIN, (out, e), {}, u)
    if shape(joined) != shape(u) or val(joined).dtype != val(u).dtype:
        return None
    return joined


def split_joins(gm: torch.fx.GraphModule) -> int:
    """Move per-token ops through the joins of ``gm`` (see the module docstring); the number of ops moved."""
    graph = gm.graph
    moved = 0
    queue = [n for n in graph.nodes if _parts(n) is not None]
    while queue:
        c = queue.pop(0)
        if getattr(c, "_erased", False) or _parts(c) is None:
            continue
        for u in list(c.users):
            rw = _Rewriter(gm)
            with graph.inserting_before(u):
                try:
                    new = _through(c, u, rw)
                except Exception:  # noqa: BLE001 - an op this pass cannot move stays where it is (exact)
                    new = None
            if new is None:
                rw.undo()
                continue
            u.replace_all_uses_with(new)
            _refresh_views(new)
            inputs = u.all_input_nodes
            graph.erase_node(u)
            _erase_unread(graph, inputs)
            moved += 1
            if _parts(new) is not None:
                queue.append(new)
    for c in graph.nodes:
        if _parts(c) is not None and _read_whole_by_attention(c):
            c.meta[WHOLE_JOIN] = True
    if moved:
        gm.recompile()
    return moved


# Marks a join an attention reads whole (its keys or values, joined after the split): no operator group takes it
# (passes/chains.py), so the groups that make its parts write into it (passes/slicing.py, write_into_joins) and
# the attention's group may take the chains of its queries (chains' move_exclusive_chains looks through it).
WHOLE_JOIN = "fxstream_whole_join"


def _read_whole_by_attention(c: torch.fx.Node) -> bool:
    """Whether ``c``, through views, is the keys or values of an attention."""
    stack, seen = [c], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target is ops.SDPA and n in u.args[1:3] and n is not u.args[0]:
                return True
            if ops.of(u).alias is ops.Alias.VIEW and u.args[0] is n:
                stack.append(u)
    return False


def whole_join(p: torch.fx.Node) -> torch.fx.Node | None:
    """The join no group takes (``WHOLE_JOIN``) that ``p`` is, or is a view of; else None."""
    while not p.meta.get(WHOLE_JOIN) and p.op == "call_function" and ops.of(p).alias is ops.Alias.VIEW:
        p = p.args[0]
    return p if p.meta.get(WHOLE_JOIN) else None


def _refresh_views(node: torch.fx.Node) -> None:
    """The views that read ``node`` now (a part where they read a slice of the join) are views of its storage:
    their fake values are derived again (the memory model groups storages by them)."""
    stack = list(node.users)
    while stack:
        u = stack.pop()
        if u.op != "call_function" or ops.of(u).alias not in (ops.Alias.VIEW, ops.Alias.RESHAPE, ops.Alias.CONVERT):
            continue
        u.meta["val"] = fake_value(u.target, u.args, u.kwargs)
        stack.extend(u.users)


def _erase_unread(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Erase the ops among ``nodes`` (and what they read, in turn) that nothing reads any more: only table ops
    (ATen values, no effects), never a placeholder or an op fxstream inserted for its effect."""
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or n.users or n.op != "call_function" or n.target not in ops.TABLE:
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


__all__ = ["WHOLE_JOIN", "join_dim", "split_joins", "whole_join"]
