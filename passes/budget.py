"""Choose how many slices each operator group gets so that the predicted peak fits a memory budget.

Input: a captured GraphModule (already grouped by :func:`passes.chains.group_operators`), its groups, and a budget
in bytes (weights + activations), or None for "as little memory as slicing can reach".
Output: a :class:`BudgetResult` with the chunk count per group, the sliced GraphModule and its predicted
memory timeline (the "graph" lifetime model: a compiled GraphModule frees each value after its last use).

Method: the floor is every group at its largest slice count (or nothing sliced, if outlining costs more than
it saves); a budget below it raises :class:`fxstream.errors.BudgetError` naming the node that bounds it. From
the floor, each group relaxes to the fewest slices that keep its own step of the timeline under the goal (what
is live around its call does not depend on its count; its workspace shrinks as 1/count), and groups whose
unsliced nodes never exceed the goal stay whole (fastest). A few repair rounds then bump any group still over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx

from fxstream.errors import BudgetError
from fxstream.runtime.sliced import slice_bounds
from passes.chains import OperatorGroup
from passes import ops
from passes.dims import val
from passes.memory import MemoryTimeline, analyze_memory, format_bytes
from passes.meta import node_info, tensor_bytes, upper_bound
from passes.slicing import apply_plan, body_workspace_bytes

# Per-slice overhead (a Python loop step and a kernel launch per op) grows with the count; past 64 slices the
# bytes saved per step are far below the full-size boundary tensors that stay live in every zoo model.
MAX_SLICES = 64
# ... except for a group whose one slice at MAX_SLICES still allocates more than the largest tensor it reads or
# hands over (its body grows with the square of its axis: an attention mask over every pair of tokens, the
# HunyuanVideo VAE's 450 GB at 720p): it may take up to this many, as many as bring a slice down to that tensor.
MAX_WIDE_SLICES = 4096
_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
           4096)
# A group that holds a key-chunked attention computes its keys and values once per slice (passes/keys.py): at
# most this many slices. Wan 2.1 14B at 720p (75,600 tokens of 5120), two blocks on meta: 8 slices reach 27% of
# eager's peak at a predicted 1.5x eager's time, 16 reach 22% at 1.8x.
KEY_SLICES = 16
# Rounds of bumping groups still over the goal after the per-group choice.
REPAIR_ROUNDS = 6
# How far above the floor the minimum-memory plan may stay to slice fewer groups.
MIN_SLACK = 0.005
# A group whose whole intermediates are below this fraction of the goal is not worth a loop: it stays whole.
SMALL_GROUP_FRACTION = 0.01


@dataclass
class BudgetResult:
    chunks: dict[str, int]
    graph_module: torch.fx.GraphModule
    timeline: MemoryTimeline
    weight_bytes: int
    # the floor's timeline (every group at its most slices, or whole where that is lower): the least each part of
    # the graph reaches, where the chosen plan relaxes groups its peak does not need sliced (None: not searched)
    floor: MemoryTimeline | None = None
    # the attentions made to chunk their keys before grouping (passes.keys.KeyCone), recorded in the Plan
    key_chunked: list = field(default_factory=list)

    @property
    def predicted_peak_bytes(self) -> int:
        return self.weight_bytes + self.timeline.activation_peak_bytes


def _next_count(k: int, cap: int) -> int | None:
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
    return _search(gm, groups, budget_bytes, target=target, max_slices=max_slices, weight_bytes=weight_bytes)


def _search(gm: torch.fx.GraphModule, groups: list[OperatorGroup], budget_bytes: int | None, *,
            target: str | None, max_slices: int, weight_bytes: int | None) -> BudgetResult:
    by_name = {g.name: g for g in groups}
    owner = {n.name: g.name for g in groups for n in g.nodes}
    body_peak: dict[str, int] = {}

    def workspace(name: str, k: int) -> int:
        if name not in body_peak:
            body_peak[name] = body_workspace_bytes(by_name[name], 1)
        length = by_name[name].length
        return math.ceil(body_peak[name] * slice_bounds(length, k)[0][1] / length)

    def build(ch: dict[str, int]) -> tuple[torch.fx.GraphModule, MemoryTimeline]:
        ws = {(name, k): workspace(name, k) for name, k in ch.items() if k > 1}
        view = apply_plan(gm, groups, ch, ws, planning=True)
        return view, analyze_memory(view, lifetime="graph", target=target)

    caps: dict[str, int] = {}

    def cap(g: OperatorGroup) -> int:
        if g.name not in caps:
            caps[g.name] = slice_cap(g, max_slices, lambda k: workspace(g.name, k))
        return caps[g.name]

    unsliced = {g.name: 1 for g in groups}
    _, t_unsliced = build(unsliced)
    weights = t_unsliced.weight_bytes if weight_bytes is None else weight_bytes
    if budget_bytes is not None and weights + t_unsliced.activation_peak_bytes <= budget_bytes:
        return _finish(gm, groups, unsliced, workspace, target, weights)

    # The floor: every group at its largest slice count (or nothing sliced, where outlining costs more).
    most = {g.name: cap(g) for g in groups}
    view, t_most = build(most)
    floor_chunks, t_floor = (most, t_most)
    if t_unsliced.activation_peak_bytes <= t_most.activation_peak_bytes:
        floor_chunks, t_floor = (unsliced, t_unsliced)
    # a group whose sliced call holds more than its nodes did unsliced (it preallocates outputs whole while its
    # inputs live) is better left whole, at the floor too
    live_most = dict(zip(t_most.nodes, t_most.live_bytes))
    live_unsliced = dict(zip(t_unsliced.nodes, t_unsliced.live_bytes))
    call_step = {node_info(n).group: live_most[n.name] for n in view.graph.nodes if n.op == "call_module"
                 and node_info(n).group is not None}
    unsliced_step = {g.name: max((live_unsliced.get(n.name, 0) for n in g.nodes), default=0) for g in groups}
    mixed = {name: 1 if unsliced_step[name] < call_step.get(name, 0) else k for name, k in most.items()}
    if mixed != most:  # also where one such group alone made "every group sliced" worse than nothing sliced
        _, t_mixed = build(mixed)
        # Where that is still no lower than nothing sliced, a group left whole because the all-sliced timeline made
        # its call look larger (its neighbours' preallocated outputs) holds the peak: slice the groups at that peak
        # again, while it helps.
        for _ in range(REPAIR_ROUNDS if t_mixed.activation_peak_bytes >= t_unsliced.activation_peak_bytes else 0):
            live = dict(zip(t_mixed.nodes, t_mixed.live_bytes))
            peak = t_mixed.activation_peak_bytes
            at_peak = {g.name for g in groups if mixed[g.name] == 1 and most[g.name] > 1
                       and max((live.get(n.name, 0) for n in g.nodes), default=0) >= peak}
            if not at_peak:
                break
            trial = {**mixed, **{name: most[name] for name in at_peak}}
            _, t_trial = build(trial)
            if t_trial.activation_peak_bytes >= peak:
                break
            mixed, t_mixed = trial, t_trial
        if t_mixed.activation_peak_bytes < t_floor.activation_peak_bytes:
            floor_chunks, t_floor = (mixed, t_mixed)
    # "as little as slicing can reach" allows MIN_SLACK above the floor: the last percent would slice dozens of
    # small groups, each a Python loop per call, for no memory anyone can use
    goal = int(t_floor.activation_peak_bytes * (1 + MIN_SLACK)) if budget_bytes is None else budget_bytes - weights
    if budget_bytes is not None and t_floor.activation_peak_bytes > goal:
        # the floor reported is the minimum plan's peak (what compile reaches with no budget), where that is lower
        lowest = _search(gm, groups, None, target=target, max_slices=max_slices, weight_bytes=weight_bytes)
        if lowest.timeline.activation_peak_bytes <= goal:
            return lowest
        if lowest.timeline.activation_peak_bytes < t_floor.activation_peak_bytes:
            t_floor = lowest.timeline
        floor = weights + t_floor.activation_peak_bytes
        error = BudgetError(
            f"budget {format_bytes(budget_bytes)} is below the smallest peak slicing can reach, "
            f"{format_bytes(floor)} (weights {format_bytes(weights)} + activations "
            f"{format_bytes(t_floor.activation_peak_bytes)}), bounded at node '{t_floor.peak_node}' in "
            f"'{t_floor.peak_module_path or '<top level>'}'",
            min_peak_bytes=floor,
            bounding_node=t_floor.peak_node,
        )
        error.lowest = lowest  # the minimum plan (what plan_chunks makes without a budget): callers reuse it
        raise error
    if floor_chunks is unsliced:
        return _finish(gm, groups, unsliced, workspace, target, weights, t_floor)

    # Relax from the floor: each group takes the fewest slices that keep its own step under the goal. Its
    # step holds what is live around the call (independent of its count) plus its workspace (~ 1/count).
    chunks: dict[str, int] = {}
    for g in groups:
        if (unsliced_step[g.name] <= goal or g.name not in call_step
                or workspace(g.name, 1) <= SMALL_GROUP_FRACTION * goal):
            chunks[g.name] = 1
            continue
        # unsliced (k=1), the group's intermediates are all live at once: at most its whole-body peak on top of
        # what is live around it (less, as its inputs die early)
        around = call_step[g.name] - workspace(g.name, cap(g))
        chunks[g.name] = next((k for k in _ladder(cap(g)) if around + workspace(g.name, k) <= goal), cap(g))

    # Repair what the per-group model missed (neighbours change each other's lifetimes a little).
    for _ in range(REPAIR_ROUNDS):
        view, timeline = build(chunks)
        if timeline.activation_peak_bytes <= goal:
            return _finish(gm, groups, chunks, workspace, target, weights, t_floor)
        nodes = {n.name: n for n in view.graph.nodes}
        over: set[str] = set()
        for name, live in zip(timeline.nodes, timeline.live_bytes):
            if live > goal:
                node = nodes.get(name)
                group = node_info(node).group if node is not None and node.op == "call_module" else owner.get(name)
                if group is not None:
                    over.add(group)
        bumped = False
        for name in over:
            nxt = _next_count(chunks[name], cap(by_name[name]))
            if nxt is not None:
                chunks[name] = nxt
                bumped = True
        if not bumped:
            break
    return _finish(gm, groups, floor_chunks, workspace, target, weights, t_floor)


def slice_cap(group: OperatorGroup, max_slices: int, workspace) -> int:
    """The most slices ``group`` may take: ``max_slices``, or more (up to :data:`MAX_WIDE_SLICES`) for a body that
    would still dwarf the group's largest boundary tensor; ``workspace(k)`` is one slice's body at ``k``."""
    k = min(group.length, max_slices)
    if any(ops.of(n).family == "keys" for n in group.nodes):
        # each slice recomputes the keys and values of a key-chunked attention (passes/keys.py)
        return min(k, KEY_SLICES)
    if k == group.length or max_slices < MAX_SLICES:
        return k
    boundary = max((_addressed_bytes(val(n)) for n in [*group.inputs, *group.outputs]), default=0)
    if workspace(k) <= boundary:
        return k
    wide = min(group.length, MAX_WIDE_SLICES)
    return next((c for c in _ladder(wide) if c > k and workspace(c) <= boundary), wide)


def _addressed_bytes(v: object) -> int:
    """Bytes a tensor's elements address: an expanded (stride-0) dim counts once (a meshgrid's grid is its
    1-D input, not the square it looks like)."""
    if not isinstance(v, torch.Tensor):
        return tensor_bytes(v)
    return v.element_size() * math.prod(upper_bound(n) for n, st in zip(v.shape, v.stride()) if st != 0)


def _ladder(cap: int) -> list[int]:
    return [c for c in _LADDER if c < cap] + [cap]


def _finish(gm, groups, chunks, workspace, target, weights, floor=None) -> BudgetResult:
    """Build the runnable sliced GraphModule for the chosen counts."""
    ws = {(name, k): workspace(name, k) for name, k in chunks.items() if k > 1}
    sliced = apply_plan(gm, groups, chunks, ws)
    return BudgetResult(chunks, sliced, analyze_memory(sliced, lifetime="graph", target=target), weights, floor)


def forced_chunks(gm: torch.fx.GraphModule, groups: list[OperatorGroup], k: int, *,
                  target: str | None = None) -> BudgetResult:
    """Every group sliced ``k`` times (capped at its axis length): for experiments and tests."""
    chunks = {g.name: min(k, g.length) for g in groups}
    sliced = apply_plan(gm, groups, chunks)
    timeline = analyze_memory(sliced, lifetime="graph", target=target)
    return BudgetResult(chunks, sliced, timeline, timeline.weight_bytes)
