"""Key-chunked attention: an attention whose keys and values are never whole.

Input: a captured GraphModule. Output (:func:`chunk_keys`, on that graph, which the caller has copied): each chosen
``scaled_dot_product_attention(q, k, v)`` replaced by a call of :class:`fxstream.runtime.keys.KeyChunkedAttention`
that recomputes k and v chunk by chunk of the key positions from what they are made of, and combines the chunks
with their log-sum-exp. The node reads q as the attention did, so an operator group still slices it along the
queries; k, v and the chain that made them (once whole, now per chunk) are gone from the graph.

Which chain (:func:`key_cones`): from k and v, back along the key axis through ops whose dim rule maps it
(:mod:`passes.dims`: a per-token norm, modulation, projection, qk-norm, rotary, head reshapes), up to values that
live past the attention anyway (the residual stream, the rotary tables, a timestep embedding), graph inputs and
weights, or values no rule maps further (a joint text + video sequence's ``cat``): each is read a chunk at a time;
operands the rule needs whole (weights, a modulation broadcast over tokens) are read whole. An
attention qualifies when it has no mask, no dropout, is not causal, attends at least as many keys as queries
(self or joint attention: cross-attention's keys are a short prompt), and that chain exists and is made of at most
:data:`MAX_CONE_NODES` nodes.

Cost: the chain runs once per call of the node, so a group that slices the queries ``s`` times computes k and v
``s`` times (:func:`passes.timing` counts it); the planner (:mod:`passes.pipeline`) chunks keys only where a budget
or the minimum asks for memory that query slicing alone cannot reach.
"""

from __future__ import annotations

import torch
import torch.fx

from fxstream.runtime.keys import KeyChunkedAttention
from fxstream.runtime.sliced import SlicedInput, slice_bounds
from passes import ops
from passes.chains import OperatorGroup
from passes.dims import WHOLE, SliceAxis, SplitReduction, arg, input_axes, shape, val
from passes.meta import module_path, tensor_bytes

# Chunks of the key positions: one chunk's keys and values are 1/16 of the whole (and the chain's intermediates
# with them); each chunk is still thousands of keys at full size, where the kernels run at their rate.
KEY_CHUNKS = 16
# A longer chain is not a transformer's per-token projection (the walk went past the block): left as it is.
MAX_CONE_NODES = 96


class KeyCone:
    """One attention that can chunk its keys: the chain from what lives anyway to its k and v, as an
    :class:`~passes.chains.OperatorGroup` along the key axis (outputs k, v)."""

    def __init__(self, attention: torch.fx.Node, group: OperatorGroup):
        self.attention = attention
        self.group = group

    @property
    def key_bytes(self) -> int:
        """Bytes of the keys and values the chunking keeps from being whole."""
        return sum(tensor_bytes(val(o)) for o in dict.fromkeys(self.group.outputs))


def _eligible(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is not ops.SDPA:
        return False
    q, k, v = (val(a) for a in node.args[:3])
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return False
    if arg(node, 3, "attn_mask") is not None or arg(node, 4, "dropout_p", 0.0) or arg(node, 5, "is_causal", False):
        return False
    if arg(node, 7, "enable_gqa", False) or q.shape[1] != k.shape[1]:
        return False
    return k.shape[-2] >= q.shape[-2] and shape(node.args[1]) is not None


def _cone(attention: torch.fx.Node, pos: dict[torch.fx.Node, int], output_users: set[torch.fx.Node]
          ) -> OperatorGroup | None:
    k, v = attention.args[1], attention.args[2]
    length = shape(k)[2]
    at = pos[attention]

    def lives_on(n: torch.fx.Node) -> bool:
        return n in output_users or any(pos[u] > at for u in n.users)

    axes: dict[torch.fx.Node, SliceAxis] = {}
    inputs: dict[torch.fx.Node, object] = {}
    stack = [(k, SliceAxis(2)), (v, SliceAxis(2))]
    while stack:
        node, axis = stack.pop()
        s = shape(node)
        if s is None or axis.dim >= len(s) or s[axis.dim] != length * axis.unit:
            return None
        if node in axes:
            if axes[node] != axis:
                return None
            continue
        req = None
        if node.op == "call_function" and not lives_on(node) and node not in inputs:
            try:
                req = input_axes(node, axis)
            except SplitReduction:
                req = None
        if req is None:  # lives on, or no rule maps the key axis further: read it, a chunk at a time
            if inputs.setdefault(node, axis) != axis:
                return None
            continue
        axes[node] = axis
        if len(axes) > MAX_CONE_NODES:
            return None
        for x, r in req.items():
            if r is WHOLE:
                if inputs.setdefault(x, WHOLE) is not WHOLE or x in axes:
                    return None
            else:
                stack.append((x, r))
    if k not in axes or v not in axes:
        return None
    members = sorted(axes, key=pos.__getitem__)
    return OperatorGroup(
        name=f"keys {module_path(attention) or attention.name}", kind="other", length=length, nodes=members,
        axes=dict(axes), inputs=dict(sorted(inputs.items(), key=lambda kv: pos[kv[0]])),
        outputs=list(dict.fromkeys([k, v])),
    )


def key_cones(gm: torch.fx.GraphModule) -> list[KeyCone]:
    """Every attention of ``gm`` whose keys and values can be chunked, with its chain; see the module docstring."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    output_users = {x for n in nodes if n.op == "output" for x in n.all_input_nodes}
    found = []
    for n in nodes:
        if _eligible(n):
            group = _cone(n, pos, output_users)
            if group is not None:
                found.append(KeyCone(n, group))
    return found


def chunk_keys(gm: torch.fx.GraphModule, names: set[str] | None = None, chunks: int = KEY_CHUNKS
               ) -> list[KeyCone]:
    """Replace the attentions of ``gm`` named in ``names`` (every one that qualifies, if None) by key-chunked
    ones, in place; returns the cones replaced (their ``attention`` the removed node). A name that does not
    qualify is left out of the result, so a caller replaying a plan can tell."""
    from passes.memory import analyze_memory
    from passes.slicing import _body, group_layout
    from passes.timing import node_costs

    cones = [c for c in key_cones(gm) if names is None or c.attention.name in names]
    if not cones:
        return []
    costs = node_costs(gm)
    graph = gm.graph
    for cone in cones:
        g, attention = cone.group, cone.attention
        k = min(chunks, g.length)
        inputs = list(g.inputs)
        _, layouts = group_layout(g)
        lengths = sorted({b - a for a, b in slice_bounds(g.length, k)})
        bodies = {n: _body(g, inputs, n, layouts[0], with_vals=False) for n in lengths}
        analysed = _body(g, inputs, lengths[-1], layouts[0])
        workspace = analyze_memory(analysed, lifetime="graph").activation_peak_bytes
        v = val(attention.args[2])
        op = KeyChunkedAttention(
            g.name, bodies, k, g.length,
            [SlicedInput(None) if a is WHOLE else SlicedInput(a.dim, a.unit) for a in g.inputs.values()],
            arg(attention, 6, "scale"), v.shape[-1], workspace,
            [costs[n] for n in g.nodes if n in costs], len(g.nodes),
        )
        with graph.inserting_before(attention):
            # what the chain reads, each through a view of its own (``view_as``: an alias with no slice rule),
            # so that a group slicing the queries can read the same tensor sliced (the residual stream, for the
            # queries and the residual add) and whole (for the keys) as two inputs
            reads = []
            for x in inputs:
                if x.op != "get_attr" and isinstance(val(x), torch.Tensor):
                    view = graph.call_function(ops.VIEW_AS, (x, x))
                    view.meta = {"val": val(x), **({"nn_module_stack": attention.meta["nn_module_stack"]}
                                                   if "nn_module_stack" in attention.meta else {})}
                    x = view
                reads.append(x)
            new = graph.call_function(op, (attention.args[0], *reads))
        new.meta = {key: attention.meta[key] for key in ("val", "nn_module_stack", "stack_trace")
                    if key in attention.meta}
        attention.replace_all_uses_with(new)
        graph.erase_node(attention)
        for n in reversed(g.nodes):  # the chain, where nothing else reads it (the query path keeps its own)
            if not n.users:
                graph.erase_node(n)
    graph.lint()
    if hasattr(gm, "meta"):
        gm.meta.pop("fxstream_costs", None)
        gm.meta.pop("fxstream_flops", None)
    return cones


def is_key_chunked(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, KeyChunkedAttention)


__all__ = ["KEY_CHUNKS", "KeyCone", "chunk_keys", "is_key_chunked", "key_cones"]
