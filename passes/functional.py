"""In-place writes turned into values: the graph every other pass reads has no mutation in it.

torch.export's graph keeps the in-place writes a forward makes through views: FreeU's
``hidden[:, :half] = hidden[:, :half] * b1`` is ``copy_(slice(slice(hidden)), mul)`` and its Fourier mask
``mask[..., a:b, c:d] = scale`` is ``fill_(slice(slice(mask)), scale)``. Every pass reasons about values (a
node's result is what its users read), so a write through a view would be invisible to them: a group that
recomputes ``mask`` per slice would not see the ``fill_``. :func:`functionalize` rewrites each such write into
the value it produces, as torch's functionalization does: the written view's new value (``aten.copy`` /
``aten.fill``, the out-of-place twins), scattered back through the view chain (``slice_scatter``,
``select_scatter``) into a new value of the base tensor; every later reader of the base, or of a view of it,
reads the new value (views are re-derived from it). The results are the same numbers.

Handled: the in-place ops of the op table (``value_of``: ``copy_``, ``fill_``, ``add_``, ``mul_``...) through
the views it knows how to write back through (``write_back``: ``slice``, ``select``, ``alias``; a conversion
that converts nothing, such as HunyuanVideo's ``mask.bool()[:, :, :, 0] = True`` on a bool mask), or none, into
a tensor the graph computed.
Anything else (a write into an input or a weight, through another view, another in-place op) stays, and
:func:`mutations` names it: the planner then leaves the graph whole (exact).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from passes import ops
from passes.memory import returns_alias
from passes.meta import fake_value, storage_key


def is_mutation(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into one of its arguments (an ATen op whose schema marks an argument written)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def mutations(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The writes left in ``gm`` (those :func:`functionalize` does not rewrite)."""
    return [n for n in gm.graph.nodes if is_mutation(n)]


def functionalize(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm``'s in-place writes through views into values (see the module docstring), in place;
    returns how many were rewritten."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    rewritten = 0
    for node in list(graph.nodes):
        twin = ops.of(node).value_of
        if twin is None:
            continue
        chain, base = _view_chain(node.args[0])
        if base is None:
            continue
        views = _views_of(base, order, order[node])
        if views is None:
            continue  # another alias of the base is read after the write: left as it is (the graph runs whole)
        value, at = _copied_value(graph, node) if twin is ops.COPY and chain else (None, node)
        if value is None:
            with graph.inserting_after(node):
                value = at = graph.call_function(twin, tuple(node.args), dict(node.kwargs))
            _propagate(value)
        last = value
        for view in reversed(chain):  # scatter the new value up the chain, into the (old) parent
            write_back = _write_back(view)
            if write_back is ops.SAME:
                continue  # a view of the whole parent: its new value is the parent's
            with graph.inserting_after(at):  # after the write: the parent may be defined after the value
                last = at = graph.call_function(write_back, (view.args[0], last, *view.args[1:]), dict(view.kwargs))
            _propagate(last)
        new_base = last
        # every later reader of the base, or of a view of it taken before the write, reads the new value
        renamed = {base: new_base}
        position = order[node]
        anchor = at
        for alias in views:
            parent = renamed.get(alias.args[0])
            if parent is None or not any(order.get(u, -1) > position for u in alias.users):
                continue
            with graph.inserting_after(anchor):
                redone = graph.call_function(alias.target, (parent, *alias.args[1:]), dict(alias.kwargs))
            _propagate(redone)
            renamed[alias] = anchor = redone
        created = {value, new_base, *renamed.values()}
        for old, new in renamed.items():
            if old is new:
                continue
            for user in list(old.users):
                if user not in created and order.get(user, -1) > position:
                    aliased = _same_storage(user, old)  # a view, or its input itself
                    user.replace_input_with(old, new)
                    _repropagate_views(user, aliased)
        for user in list(node.users):  # copy_ returns its (written) first argument
            user.replace_input_with(node, renamed.get(node.args[0], value))
        graph.erase_node(node)
        for view in reversed(chain):  # the written views, read by nothing now: a dead view would be a
            if view.users:            # group output of its base's own, keeping it alive
                break
            graph.erase_node(view)
        order = {n: i for i, n in enumerate(graph.nodes)}
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten


def _copied_value(graph: torch.fx.Graph, node: torch.fx.Node) -> tuple[torch.fx.Node | None, torch.fx.Node]:
    """The value ``copy_(view, src)`` writes, as ``src`` itself, cast to the view's dtype and expanded to its
    shape where they differ (the same numbers as ``aten.copy``, without its copy of the view's whole base:
    see ``copies_storage`` in the op table), and the last node inserted (``node`` when none was); None when
    ``src`` is not a tensor on the view's device."""
    dst, src = node.args[0], node.args[1]
    dv, sv = dst.meta.get("val"), src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    if not isinstance(dv, torch.Tensor) or not isinstance(sv, torch.Tensor) or dv.device != sv.device:
        return None, node
    value, anchor = src, node
    if sv.dtype != dv.dtype:
        with graph.inserting_after(anchor):
            value = anchor = graph.call_function(ops.TO_COPY, (value,), {"dtype": dv.dtype})
        _propagate(value)
    if tuple(sv.shape) != tuple(dv.shape):
        with graph.inserting_after(anchor):
            value = anchor = graph.call_function(ops.EXPAND, (value, list(dv.shape)))
        _propagate(value)
    return value, anchor


def _view_chain(dst: object) -> tuple[list[torch.fx.Node], torch.fx.Node | None]:
    """The slice/select views from a base tensor down to ``dst`` (base first), and the base; None for the
    base when the written tensor is not a computed value reached through such views only."""
    chain = []
    v = dst
    while isinstance(v, torch.fx.Node) and _write_back(v) is not None:
        chain.append(v)
        v = v.args[0]
    if not isinstance(v, torch.fx.Node) or v.op != "call_function" or _may_alias_its_input(v):
        return [], None  # an input, a weight, or a view of one by another op: not rewritten
    return list(reversed(chain)), v


def _write_back(view: torch.fx.Node) -> object:
    """How a write into ``view`` reaches its parent: the op table's ``write_back``, or ``SAME`` for a
    conversion that converts nothing (``.bool()`` of a bool tensor is the tensor itself, as eager returns it)."""
    if view.op != "call_function":
        return None
    info = ops.of(view)
    if info.write_back is not None:
        return info.write_back
    if info.alias is ops.Alias.CONVERT and returns_alias(view, view.args[0]):
        return ops.SAME
    return None


def _may_alias_its_input(node: torch.fx.Node) -> bool:
    return ops.of(node).alias is not ops.Alias.NONE or is_mutation(node)


def _views_of(base: torch.fx.Node, order: dict, position: int) -> list[torch.fx.Node] | None:
    """Nodes before ``position`` that are views of ``base`` through view ops (in graph order), for re-deriving;
    None when another kind of alias of it (a reshape that may be a view, a split, an eval-mode dropout) is read
    after ``position``: what it reads after the write is not known from the graph."""
    out, frontier = [], [base]
    seen = {base}
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user in seen or order.get(user, len(order)) >= position:
                continue
            alias = ops.of(user).alias
            if alias is ops.Alias.VIEW or _write_back(user) is ops.SAME:
                seen.add(user)
                out.append(user)
                frontier.append(user)
            elif alias is not ops.Alias.NONE and _read_after(user, order, position):
                return None
    return sorted(out, key=order.__getitem__)


def _read_after(node: torch.fx.Node, order: dict, position: int) -> bool:
    """Whether ``node``'s value, or an alias of it, is read after ``position``."""
    for user in node.users:
        if order.get(user, len(order)) > position:
            return True
        if ops.of(user).alias is not ops.Alias.NONE or user.target is operator.getitem:
            if _read_after(user, order, position):
                return True
    return False


def _propagate(node: torch.fx.Node) -> None:
    """``node.meta["val"]`` from its inputs' fake values (a fresh fake storage, or a view of its input's, as
    eager would give), and the module path of the node it stands in for."""
    source = node.args[0]
    node.meta["nn_module_stack"] = source.meta.get("nn_module_stack", {})
    node.meta["val"] = fake_value(node.target, node.args, node.kwargs)


def _repropagate_views(node: torch.fx.Node, aliased: bool = False) -> None:
    """A view (or an op whose value was its input itself, ``aliased``: ``type_as`` or ``to`` of a tensor that
    has the dtype already) that now reads a rewritten value shares that value's (fake) storage: its value and
    its views' values are derived again (the memory model groups storages by these values)."""
    if node.op != "call_function" or not (aliased or ops.of(node).alias is ops.Alias.VIEW):
        return
    before = node.meta.get("val")
    _propagate(node)
    for user in node.users:
        _repropagate_views(user, _same_storage(user, before))


def _same_storage(node: torch.fx.Node, other: torch.fx.Node | torch.Tensor) -> bool:
    """Whether ``node``'s tensor value shares storage with ``other``'s (a node's value, or a value)."""
    a = node.meta.get("val")
    b = other.meta.get("val") if isinstance(other, torch.fx.Node) else other
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and storage_key(a) == storage_key(b)
