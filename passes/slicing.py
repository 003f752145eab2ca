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

import math
import operator
from dataclasses import dataclass, replace

import torch
import torch.fx
# Generates a GraphModule's Python code on its first call, not on every rewrite: the planner copies and rewrites
# graphs (and builds slice bodies for plans it then discards) far more often than it runs them.
from torch.fx._lazy_graph_module import _LazyGraphModule

from fxstream.runtime.sliced import (SlicedCall, SlicedInput, SlicedOutput, SlicePass, join_buffer, join_into,
                                     slice_bounds)
from passes.chains import OperatorGroup
from passes.dims import REDUCED, WHOLE, SliceAxis, sliced_args, val
from passes.joins import join_dim
from passes.meta import fake_value, node_info, tensor_bytes
from passes import ops
from passes.reductions import fuse_group_norms
from passes.timing import LoopCost, node_costs, recomputed


def copy_graph_module(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[torch.fx.Node, torch.fx.Node]]:
    """A GraphModule over a copy of ``gm``'s graph that shares its parameters and buffers."""
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen  # pytree in/out handling; not mutated by the rewrite
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, mapping)
    graph.output(out)
    for old, new in mapping.items():
        new.meta = dict(old.meta)
    new_gm = _LazyGraphModule(gm, graph)
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


@dataclass
class _PassLayout:
    nodes: list[torch.fx.Node]  # the group's nodes this pass computes (recomputing earlier passes' values)
    targets: list[torch.fx.Node]  # what it returns, each one slot
    reduced_inputs: list[torch.fx.Node]  # complete reductions of earlier passes it reads


def group_layout(group: OperatorGroup) -> tuple[list[torch.fx.Node], list[_PassLayout]]:
    """The slots a group's loop keeps (its outputs first, then reductions read by later passes) and, for each
    pass over the slices, the nodes it runs. The last pass computes every sliced output."""
    members = set(group.nodes)
    read_later = {p for n in group.nodes for p in n.all_input_nodes
                  if p in members and group.axes[p] is REDUCED and group.passes[n] > group.passes[p]}
    slots = list(group.outputs) + [r for r in group.nodes if r in read_later and r not in group.outputs]
    reduced_slots = [r for r in slots if group.axes[r] is REDUCED]
    last = group.num_passes - 1
    layouts = []
    for k in range(group.num_passes):
        targets = [r for r in reduced_slots if group.passes[r] == k]
        if k == last:
            targets += [o for o in group.outputs if group.axes[o] is not REDUCED]
        needed: set[torch.fx.Node] = set()
        reduced_inputs: set[torch.fx.Node] = set()
        stack = list(targets)
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            for p in n.all_input_nodes:
                if p not in members:
                    continue
                if group.axes[p] is REDUCED and group.passes[p] < k:
                    reduced_inputs.add(p)
                elif p not in needed:
                    stack.append(p)
        layouts.append(_PassLayout(
            nodes=[n for n in group.nodes if n in needed],
            targets=targets,
            reduced_inputs=[r for r in reduced_slots if r in reduced_inputs],
        ))
    return slots, layouts


def _body(group: OperatorGroup, inputs: list[torch.fx.Node], n: int, layout: _PassLayout,
          with_vals: bool = True) -> torch.fx.GraphModule:
    """One pass's subgraph for a slice of ``n`` positions of the group's axis (with fake values of that slice
    on its nodes when ``with_vals``: only memory estimates need them)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for p in inputs:
        ph = graph.placeholder(p.name)
        ph.meta = {"val": _slice_val(val(p), group.inputs[p], n)} if with_vals else {}
        env[p] = ph
    for r in layout.reduced_inputs:
        ph = graph.placeholder(r.name)
        ph.meta = {"val": val(r)} if with_vals else {}
        env[r] = ph
    for node in layout.nodes:
        axis = group.axes[node]
        args, kwargs = (node.args, node.kwargs)
        if isinstance(axis, SliceAxis):
            args, kwargs = sliced_args(node, axis, n * axis.unit)
        args = torch.fx.node.map_arg(args, lambda a: env[a])
        if ops.of(node).copies_storage and args and args[0].op == "placeholder" and \
                isinstance(group.inputs.get(node.args[0]), SliceAxis):
            # the op would copy the whole storage of the sliced input (a view of the full tensor): copy the
            # slice out first, so that one slice costs a slice
            own = graph.call_function(ops.CLONE, (args[0],), {"memory_format": torch.contiguous_format})
            if with_vals:
                own.meta["val"] = _slice_val(val(node.args[0]), group.inputs[node.args[0]], n).clone(
                    memory_format=torch.contiguous_format)
            args = (own, *args[1:])
        new = graph.call_function(node.target, args, torch.fx.node.map_arg(kwargs, lambda a: env[a]))
        new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        if with_vals:
            new.meta["val"] = _slice_val(val(node), axis, n)
        env[node] = new
    graph.output(tuple(env[o] for o in layout.targets))
    if not with_vals:  # a body to run (not to analyse): statistics computed on this slice alone fuse back
        fuse_group_norms(graph)
    graph.lint()
    return _LazyGraphModule(torch.nn.Module(), graph, class_name="SliceBody")


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


def _own_storage(v):
    """A value like ``v`` with a new contiguous storage of its own (fake or meta values stay so)."""
    if isinstance(v, torch.Tensor):
        return torch.empty_like(v, memory_format=torch.contiguous_format)
    return v


def body_workspace_bytes(group: OperatorGroup, chunks: int) -> int:
    """Predicted peak of one slice's intermediates: everything the group allocates, scaled to the largest
    slice. Sliced inputs are views; whole inputs exist already; reductions are small."""
    from passes.memory import analyze_memory

    step = slice_bounds(group.length, chunks)[0][1]
    inputs = list(group.inputs)
    _, layouts = group_layout(group)
    full = max(analyze_memory(_body(group, inputs, group.length, lay), lifetime="graph").activation_peak_bytes
               for lay in layouts)
    return math.ceil(full * step / group.length)


def group_loop(group: OperatorGroup, chunks: int, table: dict) -> LoopCost:
    """What a group's loop runs (:class:`passes.timing.LoopCost`): each pass computes its nodes' whole values
    over the slices (a later pass recomputes what it needs), a body call per slice and pass, each body op a
    dispatch per slice, and the sliced outputs copied into their preallocated tensors."""
    _, layouts = group_layout(group)
    slices = len(slice_bounds(group.length, chunks))
    nodes = [n for lay in layouts for n in lay.nodes if n in table]
    again = [recomputed(n, slices) for n in nodes]  # a key-chunked attention's chain, once per slice
    return LoopCost(work=[table[n] for n in nodes] + [w for extra, _ in again for w in extra],
                    ops=len(nodes) * slices, instructions=sum(d for _, d in again), steps=slices * len(layouts),
                    copy_bytes=sum(tensor_bytes(val(o)) for o in group.outputs if isinstance(group.axes[o], SliceAxis)),
                    piece=1 / slices)


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
            passes={mapping[n]: p for n, p in group.passes.items()},
        )
        inputs = list(g.inputs)
        lengths = sorted({b - a for a, b in slice_bounds(g.length, k)})
        slots, layouts = group_layout(g)
        slot_index = {s: i for i, s in enumerate(slots)}
        passes = [
            SlicePass(
                bodies={} if planning else {n: _body(g, inputs, n, lay, with_vals=False) for n in lengths},
                target_slots=[slot_index[t] for t in lay.targets],
                reduced_slots=[slot_index[r] for r in lay.reduced_inputs],
            )
            for lay in layouts
        ]
        in_specs = [
            SlicedInput(None) if a is WHOLE else SlicedInput(a.dim, a.unit) for a in (g.inputs[p] for p in inputs)
        ]
        slot_specs = []
        for o in slots:
            a, v = g.axes[o], val(o)
            if a is REDUCED:
                slot_specs.append(SlicedOutput(tuple(v.shape), v.dtype, None, combine=ops.info(o.target).combine))
            else:
                slot_specs.append(SlicedOutput(tuple(v.shape), v.dtype, a.dim, a.unit))
        target = "sliced_" + "".join(c if c.isalnum() else "_" for c in g.name)
        while target in new_gm._modules or hasattr(gm, target):
            target += "_"
        new_gm.add_submodule(
            target, SlicedCall(g.name, passes, g.length, k, in_specs, slot_specs, num_outputs=len(g.outputs))
        )
        last = nodes[-1]
        with graph.inserting_after(last):
            call = graph.call_module(target, tuple(inputs))
        # each output is its own tensor, preallocated whole and filled slice by slice (SlicedCall), even where
        # the group computed it as a view of another (unbind's halves): its value has a storage of its own
        out_vals = tuple(_own_storage(val(o)) if isinstance(g.axes[o], SliceAxis) else val(o) for o in g.outputs)
        call.meta["val"] = out_vals
        info = node_info(call)
        info.group = g.name
        info.workspace_bytes = (workspace or {}).get((g.name, k))
        if info.workspace_bytes is None:
            info.workspace_bytes = body_workspace_bytes(g, k)
        if not planning:
            info.loop = group_loop(group, k, node_costs(gm))
        call.meta["nn_module_stack"] = last.meta.get("nn_module_stack", {})
        prev = call
        for i, o in enumerate(g.outputs):
            with graph.inserting_after(prev):
                item = graph.call_function(operator.getitem, (call, i))
            item.meta = {"val": out_vals[i], "nn_module_stack": o.meta.get("nn_module_stack", {})}
            o.replace_all_uses_with(item)
            replaced[o] = item
            prev = item
        for node in reversed(nodes):
            graph.erase_node(node)
    stable_topological_sort(graph)
    # each output leaves the call's tuple at once: an element taken later would keep the tuple, and with it every
    # other element, alive until then (a sort can move a getitem down to its first user)
    for call in [n for n in graph.nodes if n.op == "call_module" and isinstance(getattr(new_gm, n.target, None), SlicedCall)]:
        items = sorted((u for u in call.users if u.target is operator.getitem), key=lambda u: u.args[1])
        anchor = call
        for item in items:
            anchor.append(item)
            anchor = item
    write_in_place(new_gm, graph)
    write_into_joins(new_gm, graph)
    if not planning:
        fuse_group_norms(graph)  # GroupNorms split for groups that now run whole
        graph.lint()
        new_gm.recompile()
    return new_gm


def write_in_place(gm: torch.nn.Module, graph: torch.fx.Graph) -> int:
    """Let each sliced group write a sliced output into the storage of an input that dies at its call: the
    residual stream ``x + f(x)`` of a transformer block or a ResNet, sliced along tokens or frames, needs no
    second full-size tensor. Slice ``i`` of the output is written after slice ``i`` of every pass has read slice
    ``i`` of the input, and no slice reads another's, so the loop never reads what it wrote. The input must be a
    tensor the graph made (not a graph input, weight or cache), contiguous and exactly the output's shape, dtype
    and slicing, and every other reader of its storage an ancestor of the call (it has run, in any order). Sets
    ``SlicedOutput.into`` and gives the output the input's value (its storage: the memory timeline counts them
    once). Returns how many outputs were written in place."""
    from passes.memory import storage_classes
    from fxstream.runtime.rows import RowStream

    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    of, members = storage_classes(nodes)

    def fresh(m: torch.fx.Node) -> bool:
        if m.op == "call_module":
            return isinstance(getattr(gm, str(m.target), None), (SlicedCall, RowStream))
        if m.op != "call_function":
            return False
        if m.target is not operator.getitem or not isinstance(m.args[0], torch.fx.Node):
            return True
        src = m.args[0]
        return src.op == "call_function" or isinstance(getattr(gm, str(src.target), None), (SlicedCall, RowStream))

    def ancestors(call: torch.fx.Node, lo: int) -> set[torch.fx.Node]:
        seen: set[torch.fx.Node] = set()
        stack = [p for p in call.all_input_nodes if pos[p] >= lo]
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(p for p in n.all_input_nodes if pos[p] >= lo and p not in seen)
        return seen

    written = 0
    for call in nodes:
        module = getattr(gm, str(call.target), None) if call.op == "call_module" else None
        if not isinstance(module, SlicedCall):
            continue
        items = {u.args[1]: u for u in call.users if u.target is operator.getitem}
        args = list(call.args)
        taken: set[int] = set()
        specs = list(module.slot_specs)
        for i, spec in enumerate(specs[: module.num_outputs]):
            if spec.dim is None or i not in items:
                continue
            for j, (p, ispec) in enumerate(zip(args, module.input_specs)):
                v = val(p) if isinstance(p, torch.fx.Node) else None
                if (j in taken or ispec.dim != spec.dim or ispec.unit != spec.unit or not isinstance(v, torch.Tensor)
                        or tuple(v.shape) != spec.shape or v.dtype != spec.dtype or not v.is_contiguous()
                        or v.storage_offset() != 0 or len(of.get(p, ())) != 1
                        or v.untyped_storage().nbytes() != v.numel() * v.element_size()):
                    continue
                cls = of[p][0]
                group = members[cls]
                if not all(fresh(m) for m in group) or any(
                        isinstance(q, torch.fx.Node) and q is not p and cls in of.get(q, ()) for q in args):
                    continue
                readers = [u for m in group for u in m.users if u is not call and cls not in of.get(u, ())]
                lo = min(pos[n] for n in [*group, *readers])
                before = ancestors(call, lo)
                if not all(m in before for m in group) or not all(u in before for u in readers):
                    continue
                taken.add(j)
                specs[i] = replace(spec, into=j)
                item = items[i]
                item.meta["val"] = v
                call.meta["val"] = tuple(v if k == i else o for k, o in enumerate(call.meta["val"]))
                # the output and whatever aliases it are now the input's storage
                old = of[item][0]
                for m in members.pop(old, []):
                    of[m] = [cls if c == old else c for c in of[m]]
                    group.append(m)
                written += 1
                break
        module.slot_specs = specs
    return written


def write_into_joins(gm: torch.nn.Module, graph: torch.fx.Graph) -> int:
    """Let each sliced group write an output that only a ``cat`` reads straight into its range of the joined
    tensor: no 2x at a join. A joint text + video sequence's keys (the video's part from a group sliced along
    its tokens, the prompt's part beside it) were otherwise whole twice, as the part and as the join.

    The joined tensor is allocated (:func:`fxstream.runtime.sliced.join_buffer`) before the first group that
    writes into it; each such group gets its range (a view) as an argument after its inputs
    (``SlicedOutput.dest``), and the ``cat`` becomes :func:`fxstream.runtime.sliced.join_into`, which copies the
    other parts in and returns the buffer. Only the part that is at least half the join is written so (the buffer
    lives from its group on; a prompt's part may be made long before). Returns how many outputs are written
    into joins."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    written = 0
    for c in nodes:
        if c.op != "call_function" or c.target not in (ops.JOIN, ops.CONCATENATE) or not isinstance(val(c), torch.Tensor):
            continue
        parts = c.args[0]
        v = val(c)
        d = join_dim(c)
        if not isinstance(parts, (list, tuple)) or len(parts) < 2 or \
                not all(isinstance(p, torch.fx.Node) and isinstance(val(p), torch.Tensor) and val(p).dim() == v.dim()
                        for p in parts):
            continue
        chosen, offset, offsets = [], 0, []
        for p in parts:
            offsets.append(offset)
            offset += val(p).shape[d]
        for i, p in enumerate(parts):
            chain, q = [], p  # views between the group's output and the join, the join's side first
            while q.op == "call_function" and q.target in _INVERTIBLE_VIEWS and list(q.users) == [chain[-1] if chain else c]:
                chain.append(q)
                q = q.args[0]
            call = q.args[0] if q.op == "call_function" and q.target is operator.getitem else None
            module = getattr(gm, str(call.target), None) if call is not None and call.op == "call_module" else None
            if not isinstance(module, SlicedCall) or list(q.users) != [chain[-1] if chain else c] \
                    or parts.count(p) != 1:
                continue
            spec = module.slot_specs[q.args[1]]
            if spec.dim is None or spec.into is not None or spec.dest is not None or spec.dtype != v.dtype:
                continue
            if 2 * val(p).shape[d] < v.shape[d]:
                continue  # a short part (the prompt's) is copied: its group may run long before the buffer is needed
            chosen.append((i, p, q, chain, call, module))
        if not chosen:
            continue
        first = min((call for *_, call, _ in chosen), key=lambda n: pos[n])
        like = next(a for a in first.args if isinstance(a, torch.fx.Node) and isinstance(val(a), torch.Tensor))
        made, order = [], None
        # the buffer's layout: contiguous, else the layout of the largest written part (its views must reach it)
        largest = max(chosen, key=lambda t: val(t[1]).shape[d])[1]
        for order in (None, _memory_order(val(largest))):
            fake_buf = fake_value(join_buffer, (val(like), list(v.shape), v.dtype, order))
            made = []
            for i, p, q, chain, call, module in chosen:
                steps = _dest_steps(fake_buf, d, offsets[i], val(p).shape[d], chain, val(q))
                if steps is not None:
                    made.append((i, p, q, chain, call, module, steps))
            if any(t[1] is largest for t in made):
                break
        if not made:
            continue
        with graph.inserting_before(first):
            buf = graph.call_function(join_buffer, (like, list(v.shape), v.dtype, order))
        buf.meta = {"val": fake_buf, "nn_module_stack": c.meta.get("nn_module_stack", {})}
        for i, p, q, chain, call, module, (steps, vals) in made:
            dest = buf
            with graph.inserting_before(call):
                for (target, args), fv in zip(steps, vals[: len(steps)]):
                    dest = graph.call_function(target, (dest, *args))
                    dest.meta = {"val": fv, "nn_module_stack": buf.meta["nn_module_stack"]}
            k = q.args[1]
            call.args = (*call.args, dest)
            specs = list(module.slot_specs)
            specs[k] = replace(specs[k], dest=len(call.args) - 1)
            module.slot_specs = specs
            q.meta["val"] = dest.meta["val"]
            call.meta["val"] = tuple(dest.meta["val"] if j == k else o for j, o in enumerate(call.meta["val"]))
            for n, fv in zip(reversed(chain), vals[len(steps):]):  # the views of it, on the buffer now
                n.meta["val"] = fv
            written += 1
        with graph.inserting_before(c):
            joined = graph.call_function(join_into, (buf, list(parts), d))
        joined.meta = {**c.meta, "val": val(buf)}
        c.replace_all_uses_with(joined)
        graph.erase_node(c)
    if written:
        stable_topological_sort(graph)
    return written


# views whose inverse is a view: the range of the join a group output must be written into for the views between
# them to give that range
_INVERTIBLE_VIEWS = {ops.VIEW, ops.UNSAFE_VIEW, ops.UNFLATTEN, ops.PERMUTE, ops.TRANSPOSE, ops.UNSQUEEZE, ops.SQUEEZE_DIM,
                     ops.ALIAS, ops.DETACH}


def _dest_steps(buf: torch.Tensor, d: int, start: int, length: int, chain: list[torch.fx.Node],
                out: torch.Tensor) -> tuple[list, list] | None:
    """How to make, from the join's buffer, the tensor a group output is written into: the buffer's range
    ``[start, start + length)`` of ``d``, then the inverse of each view in ``chain`` (the join's side first).
    Returns the steps (target, args after the tensor) and the fake values of the steps and then of the chain's
    views redone on it (the group's side first); None where a view has no inverse that is a view, or the views
    redone do not land on the range exactly."""
    steps = [(ops.SLICE, (d, start, start + length))]
    cur = fake_value(ops.SLICE, (buf, d, start, start + length))
    vals = [cur]
    target_range = cur
    try:
        for n in chain:
            x = n.args[0]
            if n.target is ops.PERMUTE:
                dims = [a % len(n.args[1]) for a in n.args[1]]
                inv = [dims.index(i) for i in range(len(dims))]
                step = (ops.PERMUTE, (inv,))
            elif n.target is ops.TRANSPOSE:
                step = (ops.TRANSPOSE, tuple(n.args[1:3]))
            elif n.target in (ops.ALIAS, ops.DETACH):
                continue
            else:
                step = (ops.VIEW, (list(val(x).shape),))
            cur = fake_value(step[0], (cur, *step[1]))
            steps.append(step)
            vals.append(cur)
        if tuple(cur.shape) != tuple(out.shape) or cur.dtype != out.dtype:
            return None
        redone, again = cur, []
        for n in reversed(chain):
            redone = fake_value(n.target, (redone, *n.args[1:]))
            again.append(redone)
    except (RuntimeError, ValueError):  # a view that is not one on these strides
        return None
    if (tuple(redone.shape), redone.stride(), redone.storage_offset()) != \
            (tuple(target_range.shape), target_range.stride(), target_range.storage_offset()):
        return None
    return steps, vals + again


def _memory_order(t: torch.Tensor) -> list[int]:
    """``t``'s dims from outermost to innermost in memory (largest stride first; ties keep dim order)."""
    return sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))


__all__ = ["apply_plan", "write_in_place", "write_into_joins", "body_workspace_bytes", "copy_graph_module", "group_layout", "PlanningView"]
