"""Exact split reductions: GroupNorm whose statistics span the sliced axis.

SVD's temporal ResBlocks, AnimateDiff's motion modules and the SVD VAE's temporal decoder normalise over
(C/G, T, H, W). Slicing along H or the pixel axis and normalising each slice with its own statistics (what the
paper's released code does) changes the result. Here such a GroupNorm becomes two ops:

    partial = fxstream.group_norm_partial(x, G)          # per (sample, group): count, mean, M2 in float32
    y       = fxstream.group_norm_apply(x, partial, G, weight, bias, eps)

``partial`` is a reduction: a sliced group computes it per slice and combines the slices exactly (Chan et al.'s
parallel variance), then the apply runs slice by slice with the complete statistics. Unsliced, the pair equals
``aten.group_norm`` up to float reordering. Statistics accumulate in float32 for half inputs.

Input: a GraphModule and the group_norm nodes to split. Output: the same GraphModule, rewritten in place.
"""

from __future__ import annotations

import torch
import torch.fx

from passes.dims import REDUCED, SliceAxis, shape
from passes.ops import APPLY as APPLY_OP
from passes.ops import GROUP_NORM
from passes.ops import PARTIAL as PARTIAL_OP

def reduced_input_ok(node: torch.fx.Node, in_axis: SliceAxis) -> bool:
    """True when ``node`` is a reduction whose input may be sliced along ``in_axis`` with the output combined
    across slices (REDUCED)."""
    return node.target is PARTIAL_OP and in_axis.dim >= 2


def split_group_norms(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> int:
    """Replace each ``aten.group_norm`` in ``nodes`` by a partial-statistics op and an apply op.

    Returns the number of nodes rewritten. Fake values are propagated onto the new nodes.
    """
    count = 0
    for node in dict.fromkeys(nodes):
        if node.target is not GROUP_NORM or node._erased:
            continue
        x, groups = node.args[0], node.args[1]
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
        with gm.graph.inserting_before(node):
            partial = gm.graph.call_function(PARTIAL_OP, (x, groups))
            apply = gm.graph.call_function(APPLY_OP, (x, partial, groups, weight, bias, eps))
        xv = x.meta["val"]
        partial.meta = {**node.meta, "val": xv.new_empty((shape(x)[0], groups, 3), dtype=torch.float32)}
        apply.meta = {**node.meta}
        node.replace_all_uses_with(apply)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def fuse_group_norms(graph: torch.fx.Graph) -> int:
    """Turn each statistics + apply pair that ends up computing on the same tensor (a GroupNorm that was split
    for a group that runs whole, or whose slices keep the statistics' axis) back into one ``aten.group_norm``:
    the same values, one fused kernel. Returns the number of pairs fused."""
    count = 0
    for apply in list(graph.nodes):
        if apply.target is not APPLY_OP:
            continue
        x, partial, groups, weight, bias, eps = apply.args
        if not (isinstance(partial, torch.fx.Node) and partial.target is PARTIAL_OP and partial.args[0] is x
                and len(partial.users) == 1):
            continue
        with graph.inserting_before(apply):
            fused = graph.call_function(GROUP_NORM, (x, groups, weight, bias, eps))
        fused.meta = dict(apply.meta)
        apply.replace_all_uses_with(fused)
        graph.erase_node(apply)
        graph.erase_node(partial)
        count += 1
    return count


__all__ = ["REDUCED", "PARTIAL_OP", "APPLY_OP", "split_group_norms", "fuse_group_norms", "reduced_input_ok"]
