"""Outline operator groups into submodules and call them slice by slice.

Input: a GraphModule, its :class:`~passes.chains.OperatorGroup` s and a slice count per group name.
Output: a new GraphModule (sharing the original's parameters) in which each group with more than one slice is
replaced by a ``call_module`` to a :class:`fxstream.runtime.sliced.SlicedCall`, followed by one ``getitem``
per group output. The call's ``NodeInfo.workspace_bytes`` is the predicted peak of one slice's intermediates.

The shape of ``torch.fx.passes.utils.fuser_utils`` (fuse_as_graphmodule / insert_subgm / erase_nodes), with two
differences: the subgraph is specialised per slice length (static shapes, as export produced them), and ops that
spell out sizes (view, reshape, expand) are given the slice's size.
"""

from __future__ import annotations

import copy
import math
import operator

import torch
import torch.fx

from fxstream.runtime.sliced import SlicedCall, SlicedInput, SlicedOutput, slice_bounds
from passes.chains import OperatorGroup, tensor_bytes
from passes.dims import REDUCED, WHOLE, SliceAxis, sliced_args, val
from passes.meta import node_info
from passes.reductions import COMBINE


def copy_graph_module(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[torch.fx.Node, torch.fx.Node]]:
    """A GraphModule over a copy of ``gm``'s graph that shares its parameters and buffers."""
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, mapping)
    graph.output(out)
    for old, new in mapping.items():
        new.meta = dict(old.meta)
    new_gm = torch.fx.GraphModule(gm, graph)
    return new_gm, mapping


def stable_topological_sort(graph: torch.fx.Graph) -> None:
    """Reorder ``graph`` so every node follows its inputs, moving as few nodes as possible (a node that came
    too early waits for its last missing input); the rest keep their order, and so their memory timeline."""
    pending = list(reversed(graph.nodes))
    ready: set[torch.fx.Node] = set()
    waiting: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    cursor = None
    while pending:
        node = pending.pop()
        missing = [x for x in node.all_input_nodes if x not in ready]
        if missing:
            waiting.setdefault(missing[-1], []).append(node)
            continue
        ready.add(node)
        if cursor is not None and cursor.next is not node:
            cursor.append(node)
        cursor = node
        pending.extend(reversed(waiting.pop(node, [])))
    if waiting:
        raise RuntimeError("graph has a cycle after outlining; a group was not convex")


def _body(group: OperatorGroup, inputs: list[torch.fx.Node], n: int, with_vals: bool = True) -> torch.fx.GraphModule:
    """The group's subgraph for a slice of ``n`` positions of its axis (with fake values of that slice on its
    nodes when ``with_vals``: only memory estimates need them)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for p in inputs:
        ph = graph.placeholder(p.name)
        ph.meta = {"val": _slice_val(val(p), group.inputs[p], n)} if with_vals else {}
        env[p] = ph
    for node in group.nodes:
        axis = group.axes[node]
        args, kwargs = (node.args, node.kwargs)
        if isinstance(axis, SliceAxis):
            args, kwargs = sliced_args(node, axis, n * axis.unit)
        new = graph.call_function(
            node.target,
            torch.fx.node.map_arg(args, lambda a: env[a]),
            torch.fx.node.map_arg(kwargs, lambda a: env[a]),
        )
        new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        if with_vals:
            new.meta["val"] = _slice_val(val(node), axis, n)
        env[node] = new
    graph.output(tuple(env[o] for o in group.outputs))
    graph.lint()
    return torch.fx.GraphModule(torch.nn.Module(), graph, class_name="SliceBody")


def _slice_val(v, axis, n: int):
    """A fake value of one slice of ``n`` positions (for memory estimates of the body)."""
    if not isinstance(axis, SliceAxis):
        return v
    if isinstance(v, (list, tuple)):
        return type(v)(_slice_val(t, axis, n) for t in v)
    if isinstance(v, torch.Tensor):
        if v.shape[axis.dim] == n * axis.unit:
            return v
        return v.narrow(axis.dim, 0, n * axis.unit)
    return v


def body_workspace_bytes(group: OperatorGroup, chunks: int) -> int:
    """Predicted peak of one slice's intermediates: everything the group allocates, scaled to the largest
    slice. Sliced inputs are views; whole inputs exist already; reductions are small."""
    from passes.memory import analyze_memory

    step = slice_bounds(group.length, chunks)[0][1]
    inputs = list(group.inputs)
    body = _body(group, inputs, group.length)
    full = analyze_memory(body, lifetime="graph").activation_peak_bytes
    return math.ceil(full * step / group.length)


class PlanningView(torch.nn.Module):
    """A rewritten graph to analyse, not to run: no code generated, no bodies built, attributes from ``gm``."""

    def __init__(self, gm: torch.fx.GraphModule, graph: torch.fx.Graph):
        super().__init__()
        self.graph = graph
        self._source = gm

    def add_submodule(self, name: str, module: torch.nn.Module) -> None:
        setattr(self, name, module)

    def recompile(self) -> None:
        pass

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_source"], name)


def apply_plan(gm: torch.fx.GraphModule, groups: list[OperatorGroup], chunks: dict[str, int],
               workspace: dict[tuple[str, int], int] | None = None, *,
               planning: bool = False) -> torch.fx.GraphModule:
    """Return a copy of ``gm`` in which every group with ``chunks[name] > 1`` runs slice by slice.

    With ``planning``, the copy is a :class:`PlanningView` for memory analysis only (much cheaper to build).
    """
    if planning:
        graph = torch.fx.Graph()
        mapping: dict[torch.fx.Node, torch.fx.Node] = {}
        graph.output(graph.graph_copy(gm.graph, mapping))
        for old, new in mapping.items():
            new.meta = dict(old.meta)
        new_gm = PlanningView(gm, graph)
    else:
        new_gm, mapping = copy_graph_module(gm)
    graph = new_gm.graph
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # outputs of groups already outlined -> their getitem
    for group in groups:
        k = chunks.get(group.name, 1)
        if k <= 1:
            continue
        k = min(k, group.length)
        nodes = [mapping[n] for n in group.nodes]
        g = OperatorGroup(
            name=group.name,
            kind=group.kind,
            length=group.length,
            nodes=nodes,
            axes={mapping[n]: a for n, a in group.axes.items()},
            inputs={replaced.get(mapping[p], mapping[p]): a for p, a in group.inputs.items()},
            outputs=[mapping[o] for o in group.outputs],
        )
        inputs = list(g.inputs)
        lengths = sorted({b - a for a, b in slice_bounds(g.length, k)})
        bodies = {} if planning else {n: _body(g, inputs, n, with_vals=False) for n in lengths}
        in_specs = [
            SlicedInput(None) if a is WHOLE else SlicedInput(a.dim, a.unit) for a in (g.inputs[p] for p in inputs)
        ]
        out_specs = []
        for o in g.outputs:
            a, v = g.axes[o], val(o)
            if a is REDUCED:
                out_specs.append(SlicedOutput(tuple(v.shape), v.dtype, None, combine=COMBINE[o.target]))
            else:
                out_specs.append(SlicedOutput(tuple(v.shape), v.dtype, a.dim, a.unit))
        target = "sliced_" + "".join(c if c.isalnum() else "_" for c in g.name)
        while target in new_gm._modules or hasattr(gm, target):
            target += "_"
        new_gm.add_submodule(target, SlicedCall(g.name, bodies, g.length, k, in_specs, out_specs))
        last = nodes[-1]
        with graph.inserting_after(last):
            call = graph.call_module(target, tuple(inputs))
        call.meta["val"] = tuple(val(o) for o in g.outputs)
        info = node_info(call)
        info.group = g.name
        info.workspace_bytes = (workspace or {}).get((g.name, k))
        if info.workspace_bytes is None:
            info.workspace_bytes = body_workspace_bytes(g, k)
        call.meta["nn_module_stack"] = last.meta.get("nn_module_stack", {})
        prev = call
        for i, o in enumerate(g.outputs):
            with graph.inserting_after(prev):
                item = graph.call_function(operator.getitem, (call, i))
            item.meta = {"val": val(o), "nn_module_stack": o.meta.get("nn_module_stack", {})}
            o.replace_all_uses_with(item)
            replaced[o] = item
            prev = item
        for node in reversed(nodes):
            graph.erase_node(node)
    stable_topological_sort(graph)
    if not planning:
        graph.lint()
        new_gm.recompile()
    return new_gm


__all__ = ["apply_plan", "body_workspace_bytes", "copy_graph_module", "tensor_bytes"]
