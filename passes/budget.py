"""Choose how many slices each operator group gets so that the predicted peak fits a memory budget.

Input: a captured GraphModule (already grouped by :func:`passes.chains.find_groups`), its groups, and a budget
in bytes (weights + activations), or None for "as little memory as slicing can reach".
Output: a :class:`BudgetResult` with the chunk count per group, the sliced GraphModule and its predicted
memory timeline (the "graph" lifetime model: a compiled GraphModule frees each value after its last use).

Method: start unsliced; repeatedly find every step of the predicted timeline above the target and give the
group running there the next slice count, until the peak fits or the steps above the target are not in any
group that can be sliced further (that floor is reported by :class:`fxstream.errors.BudgetError`). Slice
counts only grow where the peak needs them, so groups away from the peak keep running whole (fastest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from fxstream.errors import BudgetError
from passes.chains import OperatorGroup
from passes.memory import MemoryTimeline, analyze_memory, format_bytes
from passes.meta import node_info
from passes.slicing import apply_plan, body_workspace_bytes

# Per-slice overhead (a Python loop step and a kernel launch per op) grows with the count; past 64 slices the
# bytes saved per step are far below the full-size boundary tensors that stay live in every zoo model.
MAX_SLICES = 64
_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class BudgetResult:
    chunks: dict[str, int]
    graph_module: torch.fx.GraphModule
    timeline: MemoryTimeline
    weight_bytes: int

    @property
    def predicted_peak_bytes(self) -> int:
        return self.weight_bytes + self.timeline.activation_peak_bytes


def _next_count(k: int, length: int, max_slices: int) -> int | None:
    cap = min(length, max_slices)
    for c in _LADDER:
        if c > k and c <= cap:
            return c
    return cap if k < cap else None


def plan_chunks(
    gm: torch.fx.GraphModule,
    groups: list[OperatorGroup],
    budget_bytes: int | None,
    *,
    target: str | None = None,
    max_slices: int = MAX_SLICES,
    weight_bytes: int | None = None,
) -> BudgetResult:
    """Slice counts per group meeting ``budget_bytes`` with the fewest slices; see the module docstring."""
    by_name = {g.name: g for g in groups}
    owner = {n.name: g.name for g in groups for n in g.nodes}
    chunks = {g.name: 1 for g in groups}
    cache: dict[tuple[str, int], int] = {}

    def build(ch: dict[str, int]) -> tuple[torch.fx.GraphModule, MemoryTimeline]:
        for name, k in ch.items():
            if k > 1 and (name, k) not in cache:
                cache[(name, k)] = body_workspace_bytes(by_name[name], k)
        sliced = apply_plan(gm, groups, ch, cache, planning=True)
        return sliced, analyze_memory(sliced, lifetime="graph", target=target)

    sliced, timeline = build(chunks)
    weights = timeline.weight_bytes if weight_bytes is None else weight_bytes
    best = (dict(chunks), sliced, timeline)
    while True:
        total = weights + timeline.activation_peak_bytes
        if budget_bytes is not None and total <= budget_bytes:
            return _finish(gm, groups, chunks, cache, target, weights)
        threshold = timeline.activation_peak_bytes if budget_bytes is None else budget_bytes - weights
        nodes = {n.name: n for n in sliced.graph.nodes}
        bumped = False
        for name, live in zip(timeline.nodes, timeline.live_bytes):
            if live < threshold:
                continue
            node = nodes.get(name)
            group = node_info(node).group if node is not None and node.op == "call_module" else owner.get(name)
            if group is None:
                continue
            nxt = _next_count(chunks[group], by_name[group].length, max_slices)
            if nxt is not None:
                chunks[group] = nxt
                bumped = True
        if not bumped:
            break
        sliced, timeline = build(chunks)
        if timeline.activation_peak_bytes < best[2].activation_peak_bytes:
            best = (dict(chunks), sliced, timeline)
    chunks, _, timeline = best
    floor = weights + timeline.activation_peak_bytes
    if budget_bytes is not None and floor > budget_bytes:
        raise BudgetError(
            f"budget {format_bytes(budget_bytes)} is below the smallest peak slicing can reach, "
            f"{format_bytes(floor)} (weights {format_bytes(weights)} + activations "
            f"{format_bytes(timeline.activation_peak_bytes)}), bounded at node '{timeline.peak_node}' in "
            f"'{timeline.peak_module_path or '<top level>'}'",
            min_peak_bytes=floor,
            bounding_node=timeline.peak_node,
        )
    return _finish(gm, groups, chunks, cache, target, weights)


def _finish(gm, groups, chunks, cache, target, weights) -> BudgetResult:
    """Build the runnable sliced GraphModule for the chosen counts."""
    sliced = apply_plan(gm, groups, chunks, cache)
    return BudgetResult(chunks, sliced, analyze_memory(sliced, lifetime="graph", target=target), weights)


def forced_chunks(gm: torch.fx.GraphModule, groups: list[OperatorGroup], k: int, *,
                  target: str | None = None) -> BudgetResult:
    """Every group sliced ``k`` times (capped at its axis length): for experiments and tests."""
    chunks = {g.name: min(k, g.length) for g in groups}
    sliced = apply_plan(gm, groups, chunks)
    timeline = analyze_memory(sliced, lifetime="graph", target=target)
    return BudgetResult(chunks, sliced, timeline, timeline.weight_bytes)
