"""The planner: one entry point from a captured graph and a request to a Plan and the graph that runs it.

Input: a captured ATen GraphModule (``meta["val"]`` and ``meta["nn_module_stack"]`` on every node; see
``fxstream.capture``) and a :class:`PlanRequest` (budget or forced slice count, target device, Step Rehash).
Output: a :class:`Planned`: the :class:`~passes.plan.Plan` (what was decided), the GraphModule that runs it
(sharing the captured graph's parameters), and the baseline (eager) and planned memory timelines.

The passes it runs, in order: Step Rehash variants (:mod:`passes.rehash`), operator grouping with split
reductions (:mod:`passes.chains`, :mod:`passes.reductions`), slice counts for the budget (:mod:`passes.budget`)
and, where operator groups alone cannot reach the budget or for the minimum where it lowers the peak, row
streaming of the graph's tail (:mod:`passes.rows`) and attentions whose keys and values are made chunk by chunk
(:mod:`passes.keys`, planned again on a copy so rewritten). The captured graph itself is never modified.

Never an internal error: what the passes cannot slice they leave whole. Should a pass still fail on a graph
(a pattern no rule foresaw), the graph runs unsliced, exactly, and the Plan's notes say where planning
stopped and why. Only a user problem raises: :class:`fxstream.errors.BudgetError` for a budget below every
plan.
"""

from __future__ import annotations

import hashlib
import traceback
import warnings
from dataclasses import dataclass

import torch
import torch.fx

from fxstream.errors import BudgetError, FxStreamError, PlanMismatchError, PlanningWarning
from fxstream.runtime.rehash import FeatureCache, RehashConfig
from fxstream.runtime.sliced import slice_bounds
from passes import ops
from passes.budget import BudgetResult, forced_chunks, plan_chunks
from passes.chains import OperatorGroup, group_operators
from passes.functional import mutations
from passes.keys import KEY_CHUNKS, chunk_keys, key_cones
from passes.meta import node_info, tensor_bytes
from passes.memory import MemoryTimeline, analyze_memory, format_bytes
from passes.plan import PLAN_VERSION, GroupPlan, Plan, RehashPlan
from passes.rows import RowAnalysis, RowChoice, choose_tail, outline, segment_estimate
from passes.slicing import apply_plan, copy_graph_module
from passes.timing import costs_for, graph_seconds

# The minimum-memory plan streams the tail by rows only when that lowers the predicted peak by this fraction:
# the recomputation of halos and statistics passes is not worth less.
ROW_GAIN = 0.05
# ... and makes attentions' keys chunk by chunk (recomputing them once per query slice) only for this much.
KEY_GAIN = 0.05
# Tails tried for a budget before the lowest-memory one: each for the budget's activations lowered by what the
# whole graph missed the budget by with the one before.
TAIL_TRIES = 3


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for: a budget in bytes (weights + activations; None: as little as slicing can reach), or
    ``chunks`` slices in every group; the device whose kernels the memory model assumes; Step Rehash."""

    budget_bytes: int | None = None
    chunks: int | None = None
    target: str = "cpu"
    signature: str = ""
    rehash: RehashConfig | None = None


@dataclass
class PartialGraph:
    """The rehash step's graph (see :mod:`passes.rehash`), planned under the same request."""

    graph_module: torch.fx.GraphModule
    planned: MemoryTimeline
    chunks: dict[str, int]


@dataclass
class Planned:
    """The planner's result: the Plan, the graph that runs it, and the memory timelines it predicts."""

    plan: Plan
    graph_module: torch.fx.GraphModule
    baseline: MemoryTimeline
    planned: MemoryTimeline
    partial: PartialGraph | None = None


def plan(gm: torch.fx.GraphModule, request: PlanRequest, *, cache: FeatureCache | None = None) -> Planned:
    """Plan ``gm`` for ``request``; see the module docstring. With Step Rehash, the full graph stores the cache
    point's value in ``cache`` (a new one if None) and a partial graph for rehash steps is planned too."""
    original = gm
    baseline = analyze_memory(gm, lifetime="eager", target=request.target)
    rehash_info = None
    partial = None
    if request.rehash is not None:
        from passes import rehash as rehash_pass

        point = rehash_pass.resolve(gm, request.rehash.cache_point)
        cache = cache if cache is not None else FeatureCache()
        partial_gm = rehash_pass.partial_graph(gm, point.node, cache)
        gm = rehash_pass.full_graph(gm, point.node, cache)
        p_groups, p_result, p_streamed, _, _ = _slice_or_whole(partial_gm, request)
        partial = PartialGraph(p_result.graph_module, p_result.timeline, dict(p_result.chunks))
        rehash_info = RehashPlan(
            cache_point=point.path, module_class=point.module_class, node=point.node,
            skipped_fraction=point.skipped_fraction, cached_bytes=point.nbytes,
            flops_full=point.flops_full, flops_partial=point.flops_partial,
            partial_predicted_activation_peak_bytes=p_result.timeline.activation_peak_bytes,
            partial_sliced_groups=sum(1 for k in p_result.chunks.values() if k > 1),
            config=request.rehash,
            partial_groups=_decisions(p_groups, p_result, p_streamed),
        )
    groups, result, streamed, notes, grouped = _slice_or_whole(gm, request)
    if streamed:  # planned on a copy: its split GroupNorms, and those the row segments compute in passes
        split = sum(1 for n in result.graph_module.graph.nodes if n.target is ops.PARTIAL)
        split += sum(len(c.segment.norms) for c in streamed)
    else:
        split = sum(1 for n in grouped.graph.nodes if n.target is ops.PARTIAL)
    planned = result.timeline
    activation_peak = planned.activation_peak_bytes
    if partial is not None:
        activation_peak = max(activation_peak, partial.planned.activation_peak_bytes)
    decided = Plan(
        groups=_decisions(groups, result, streamed),
        predicted_peak_bytes=result.weight_bytes + activation_peak,
        predicted_activation_peak_bytes=activation_peak,
        baseline_peak_bytes=baseline.weight_bytes + baseline.activation_peak_bytes,
        baseline_activation_peak_bytes=baseline.activation_peak_bytes,
        weight_bytes=result.weight_bytes,
        budget_bytes=request.budget_bytes,
        peak_node=planned.peak_node,
        peak_module_path=planned.peak_module_path,
        target=request.target,
        signature=request.signature,
        candidate_groups=len(groups),
        split_reductions=split,
        notes=notes,
        rehash=rehash_info,
        fingerprint=fingerprint(original, request),
    )
    _predict_time(decided, original, result.graph_module, request)
    return Planned(decided, result.graph_module, baseline, planned, partial)


def _predict_time(decided: Plan, original: torch.fx.GraphModule, planned: torch.fx.GraphModule,
                  request: PlanRequest) -> None:
    """The time model's seconds of one call, planned and eager, recorded in the Plan."""
    costs = costs_for(request.target)
    decided.baseline_seconds = graph_seconds(original, costs)
    decided.predicted_seconds = graph_seconds(planned, costs)
    decided.time_model = f"{costs.kind}: {costs.source}"


def _decisions(groups: list[OperatorGroup], result: BudgetResult, streamed: list) -> list[GroupPlan]:
    """What was decided, as the Plan records it: the key-chunked attentions, the sliced groups, then the
    row-streamed segments."""
    out = []
    for c in result.key_chunked:
        g = c.group
        out.append(GroupPlan(
            name=g.name, kind="keys", axis="keys", length=g.length, slices=len(slice_bounds(g.length, KEY_CHUNKS)),
            nodes=len(g.nodes), intermediate_bytes=c.key_bytes, dim=2, start=c.attention.name,
        ))
    for g in groups:
        k = result.chunks.get(g.name, 1)
        if k <= 1:
            continue
        axis = _first_axis(g)
        out.append(GroupPlan(
            name=g.name, kind=g.kind, axis=_axis_text(g), length=g.length,
            slices=len(slice_bounds(g.length, k)), nodes=len(g.nodes), intermediate_bytes=g.intermediate_bytes(),
            dim=axis.dim, unit=axis.unit, members=[n.name for n in g.nodes], passes=g.num_passes,
        ))
    for c in streamed:
        seg = c.segment
        out.append(GroupPlan(
            name=seg.name, kind="rows",
            axis=f"rows (dim {seg.row_dim[seg.output]}), {seg.num_passes} passes",
            length=seg.finest, slices=c.bands, nodes=len(seg.nodes),
            intermediate_bytes=sum(tensor_bytes(n.meta.get("val")) for n in seg.nodes),
            dim=seg.row_dim[seg.output], start=seg.input.name, end=seg.output.name, passes=seg.num_passes,
        ))
    return out


def fingerprint(gm: torch.fx.GraphModule, request: PlanRequest) -> str:
    """A digest of what a Plan depends on: the captured graph's structure (each node's op, target, arguments'
    structure and value shapes and dtypes), the input signature and the target device. Weights' values do not
    enter it: a plan holds for any weights of the same architecture."""
    h = hashlib.sha256()
    h.update(f"{request.target}|{request.signature}|".encode())
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        vals = v if isinstance(v, (list, tuple)) else [v]
        spec = ",".join(f"{tuple(t.shape)}:{t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                        for t in vals)
        args = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{a.name}")
        h.update(f"{n.op}|{n.name}|{n.target}|{args}|{spec}\n".encode())
    return h.hexdigest()[:32]


def replay(gm: torch.fx.GraphModule, decided: Plan, request: PlanRequest, *,
           cache: FeatureCache | None = None) -> Planned:
    """The graph a saved Plan decided, rebuilt without searching: the same groups and slice counts, the same
    row-streamed segments and bands. Raises :class:`fxstream.errors.PlanMismatchError`, saying what differs,
    when the plan was made for another graph, input signature, target or plan format.
    """
    _check_match(gm, decided, request)
    baseline = analyze_memory(gm, lifetime="eager", target=request.target)
    partial = None
    if decided.rehash is not None:
        from passes import rehash as rehash_pass

        point = rehash_pass.resolve(gm, decided.rehash.config.cache_point)
        cache = cache if cache is not None else FeatureCache()
        partial_gm = rehash_pass.partial_graph(gm, point.node, cache)
        gm = rehash_pass.full_graph(gm, point.node, cache)
        p_result = _rebuild(partial_gm, decided.rehash.partial_groups, request)
        partial = PartialGraph(p_result.graph_module, p_result.timeline, dict(p_result.chunks))
    result = _rebuild(gm, decided.groups, request)
    decided.details = None
    if decided.predicted_seconds is None:
        _predict_time(decided, gm, result.graph_module, request)
    return Planned(decided, result.graph_module, baseline, result.timeline, partial)


def _check_match(gm: torch.fx.GraphModule, decided: Plan, request: PlanRequest) -> None:
    if decided.version != PLAN_VERSION:
        raise PlanMismatchError(f"the plan is in format version {decided.version}; this fxstream replays version "
                                f"{PLAN_VERSION}: plan again (fxstream.plan) and save the new plan")
    if decided.signature != request.signature:
        raise PlanMismatchError(f"the plan was made for inputs ({decided.signature}), not ({request.signature}): "
                                "plan again for these inputs")
    if decided.target != request.target:
        raise PlanMismatchError(f"the plan was made for target {decided.target!r}, not {request.target!r}")
    if decided.fingerprint != fingerprint(gm, request):
        raise PlanMismatchError("the plan was made for another graph (same inputs; the module's code, config or "
                                "library versions differ): plan again")


def _rebuild(gm: torch.fx.GraphModule, decisions: list[GroupPlan], request: PlanRequest) -> BudgetResult:
    """Row-stream the recorded segments, regroup (deterministic) and slice the recorded groups, on a copy."""
    work = copy_graph_module(gm)[0]
    keyed = [g for g in decisions if g.kind == "keys"]
    cones = []
    if keyed:
        cones = chunk_keys(work, {g.start for g in keyed}, max(g.slices for g in keyed))
        if len(cones) != len(keyed):
            raise PlanMismatchError("the plan's key-chunked attentions are not this graph's: plan again")
    segments = [g for g in decisions if g.kind == "rows"]
    if segments:
        analysis = RowAnalysis(work, costs_for(request.target))
        named = {n.name: n for n in work.graph.nodes}
        choices = []
        for g in segments:
            seg = analysis.segment(named[g.start], named[g.end], limit=False) \
                if g.start in named and g.end in named else None
            if seg is None or seg.num_passes != g.passes:
                raise PlanMismatchError(f"the plan's row-streamed segment '{g.name}' ({g.start} .. {g.end}) does not "
                                        "match this graph: plan again")
            choices.append(RowChoice(seg, g.slices, *segment_estimate(seg, g.slices)))
        outline(work, choices)
    work, found, _ = group_operators(work)
    groups = {g.name: g for g in found}
    chunks = {}
    for g in decisions:
        if g.kind in ("rows", "keys"):
            continue
        found = groups.get(g.name)
        if found is None or [n.name for n in found.nodes] != g.members:
            raise PlanMismatchError(f"the plan's group '{g.name}' is not one of this graph's operator groups: plan again")
        chunks[g.name] = g.slices
    sliced = apply_plan(work, list(groups.values()), chunks)
    timeline = analyze_memory(sliced, lifetime="graph", target=request.target)
    return BudgetResult(chunks, sliced, timeline, timeline.weight_bytes, key_chunked=cones)


def _first_axis(group: OperatorGroup):
    return next(a for a in (group.axes[o] for o in group.nodes) if hasattr(a, "dim"))


def _axis_text(group: OperatorGroup) -> str:
    axis = _first_axis(group)
    return f"dim {axis.dim}" + (f" x{axis.unit}" if axis.unit != 1 else "")


def _slice_or_whole(gm: torch.fx.GraphModule, request: PlanRequest
                    ) -> tuple[list[OperatorGroup], BudgetResult, list, list[str], torch.fx.GraphModule]:
    """:func:`_slice` (``gm`` is never changed), or ``gm`` whole (exact) with a note when a pass fails on a
    pattern it does not know. The last value is the graph the groups were found in. A user problem (the
    budget) still raises.
    """
    try:
        written = mutations(gm)
        if written:  # a write functionalize could not turn into a value: no pass may move a reader across it
            raise _Unsliceable(f"{written[0].name} ({written[0].target}) writes in place into "
                               f"{written[0].args[0]}")
        groups, result, streamed, grouped = _slice(gm, request.budget_bytes, request.chunks, request.target)
        return groups, result, streamed, [], grouped
    except FxStreamError:
        raise
    except Exception as e:  # noqa: BLE001 - the net under every pass: leave the graph whole, never crash
        where = _failing_frame(e)
        note = (f"planning stopped in {where}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                "; the graph runs whole (exact, unsliced)")
        warnings.warn(f"fxstream: {note}", PlanningWarning, stacklevel=3)
    timeline = analyze_memory(gm, lifetime="graph", target=request.target)
    whole = BudgetResult({}, gm, timeline, timeline.weight_bytes)
    if request.budget_bytes is not None and whole.predicted_peak_bytes > request.budget_bytes:
        raise BudgetError(
            f"budget {format_bytes(request.budget_bytes)} cannot be met: planning stopped ({note}), and the "
            f"whole graph needs {format_bytes(whole.predicted_peak_bytes)}",
            min_peak_bytes=whole.predicted_peak_bytes, bounding_node=timeline.peak_node,
        )
    return [], whole, [], [note], gm


class _Unsliceable(Exception):
    """A graph no pass may rewrite; the note says why."""


def _failing_frame(e: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/passes/" in f.filename.replace("\\", "/")]
    f = frames[-1] if frames else traceback.extract_tb(e.__traceback__)[-1]
    return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})"


def _slice(gm: torch.fx.GraphModule, budget_bytes: int | None, chunks: int | None,
           target: str, rows: bool = True, keys: bool = True
           ) -> tuple[list[OperatorGroup], BudgetResult, list, torch.fx.GraphModule]:
    """Group ``gm``'s operators and choose slice counts: ``chunks`` everywhere, or for the budget.

    When the budget is out of reach of operator groups alone (or for the minimum), the graph's tail is
    row-streamed (:mod:`passes.rows`) where that lowers the peak, and attentions' keys and values are made chunk
    by chunk (:mod:`passes.keys`) where that does (by ``KEY_GAIN``, for the minimum); the third value lists the
    streamed segments, the fourth is the graph the groups were found in. ``gm`` is not changed.
    """
    if chunks is not None:
        grouped, groups, _ = group_operators(gm)
        return groups, forced_chunks(grouped, groups, chunks, target=target), [], grouped
    try:
        plain, error = _slice_budget(gm, budget_bytes, target, rows), None
    except BudgetError as e:
        plain, error = None, e
    names = set()
    if keys and budget_bytes is None:
        names = _whole_keys(gm, plain)
    elif keys and plain is None:
        # the attentions the minimum would chunk (against the minimum plan without chunked keys): chunking every
        # attention's keys can reach less low than chunking those alone, and a budget a little above the
        # minimum must then still be met
        names = _whole_keys(gm, getattr(error, "minimum", None) or _slice_budget(gm, None, target, rows))
    if names:
        try:
            keyed = _slice_keyed(gm, budget_bytes, target, rows, names)
        except BudgetError as e:
            if error is not None and e.min_peak_bytes < error.min_peak_bytes:
                error = e
            keyed = None
        if keyed is not None and (plain is None or keyed[1].timeline.activation_peak_bytes
                                  < plain[1].timeline.activation_peak_bytes * (1 - KEY_GAIN)):
            return keyed
    if plain is None:
        raise error
    return plain


def _whole_keys(gm: torch.fx.GraphModule, plain: tuple | None) -> set[str]:
    """The attentions whose keys and values could be made chunk by chunk (:func:`passes.keys.key_cones`) and
    that the plan without it, ``plain``, keeps whole: sliced along their queries or not at all (an attention
    sliced along frames or heads has its keys in slices already). Every one that qualifies, without a plan."""
    cones = key_cones(gm)
    names = {c.attention.name for c in cones}
    if plain is None or not names:
        return names
    groups, result = plain[0], plain[1]
    # only where an attention or what makes its keys holds the plan's peak (a group's call, or a node): elsewhere
    # nothing would move
    peak = next((n for n in result.graph_module.graph.nodes if n.name == result.timeline.peak_node), None)
    group = node_info(peak).group if peak is not None and peak.op == "call_module" else None
    at_peak = {n.name for g in groups if g.name == group for n in g.nodes} | {result.timeline.peak_node}
    if not any(at_peak & {c.attention.name, *(n.name for n in c.group.nodes)} for c in cones):
        return set()
    split = set()
    for g in groups:
        if result.chunks.get(g.name, 1) > 1:
            for n in g.nodes:
                axis = g.axes.get(n)
                if n.name in names and hasattr(axis, "dim") and axis.dim != len(n.meta["val"].shape) - 2:
                    split.add(n.name)
    return names - split


def _slice_keyed(gm: torch.fx.GraphModule, budget_bytes: int | None, target: str, rows: bool, names: set[str]
                 ) -> tuple[list[OperatorGroup], BudgetResult, list, torch.fx.GraphModule]:
    """:func:`_slice_budget` on a copy of ``gm`` whose attentions ``names`` make their keys chunk by chunk."""
    work = copy_graph_module(gm)[0]
    cones = chunk_keys(work, names)
    found = _slice_budget(work, budget_bytes, target, rows)
    found[1].key_chunked = cones
    return found


def _slice_budget(gm: torch.fx.GraphModule, budget_bytes: int | None, target: str, rows: bool
                  ) -> tuple[list[OperatorGroup], BudgetResult, list, torch.fx.GraphModule]:
    """Slice counts for the budget (row-streaming the tail where groups alone cannot reach it); see :func:`_slice`."""
    grouped, groups, _ = group_operators(gm)
    try:
        result, error = plan_chunks(grouped, groups, budget_bytes, target=target), None
    except BudgetError as e:
        result, error = None, e
    # the minimum plan of the groups alone, where the budget's search made it on the way to its error
    lowest = getattr(error, "lowest", None)
    if rows and (result is None or budget_bytes is None):
        streamed = stream_tail(gm, budget_bytes, target, result)
        if streamed is not None:
            return streamed
        if result is None:
            streamed = stream_tail(gm, None, target, lowest)
            if streamed is not None:  # the floor the error reports is the one row streaming reaches
                t = streamed[1]
                floor = t.weight_bytes + t.timeline.activation_peak_bytes
                e = BudgetError(
                    f"budget {format_bytes(budget_bytes)} is below the smallest peak slicing can reach, "
                    f"{format_bytes(floor)} (weights {format_bytes(t.weight_bytes)} + activations "
                    f"{format_bytes(t.timeline.activation_peak_bytes)}), bounded at node "
                    f"'{t.timeline.peak_node}' in '{t.timeline.peak_module_path or '<top level>'}'",
                    min_peak_bytes=floor, bounding_node=t.timeline.peak_node,
                )
                e.minimum = streamed  # what _slice_budget(gm, None, ...) returns, for the caller to reuse
                raise e from error
    if result is None:
        if lowest is not None:
            error.minimum = (groups, lowest, [], grouped)
        raise error
    return groups, result, [], grouped


def stream_tail(gm: torch.fx.GraphModule, budget_bytes: int | None, target: str,
                base: BudgetResult | None) -> tuple[list[OperatorGroup], BudgetResult, list, torch.fx.GraphModule] | None:
    """Plan a copy of ``gm`` with its tail row-streamed (:mod:`passes.rows`); None when that does not help.

    Under a budget, first the streamed tail with the least recomputation that fits (a lower goal where the whole
    graph misses the budget with it: ``TAIL_TRIES``), then the lowest-memory one; without a budget, the
    lowest-memory one, kept only if it lowers the peak by ``ROW_GAIN``.
    """
    first = copy_graph_module(gm)[0]
    analysis = RowAnalysis(first, costs_for(target))
    if not analysis.cut_points():
        return None
    if base is None:
        probe, probe_groups, _ = group_operators(gm)
        base = plan_chunks(probe, probe_groups, None, target=target)
    # what the rest of the graph can reach before each start: the floor, not the minimum plan, which leaves
    # groups sliced no more than the peak the streamed tail removes asks of them
    floor = base.floor or base.timeline
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    at = [0] * (len(order) + 1)  # the floor's peak live bytes at each original position
    position = 0
    for name, live in zip(floor.nodes, floor.live_bytes):
        position = max(position, order.get(name, position))
        at[position] = max(at[position], live)
    prefix, running = {}, 0
    for n in gm.graph.nodes:  # the peak before each node
        prefix[n.name] = running
        running = max(running, at[order[n.name]])
    # Under a budget: the tail for the budget's activations; where the whole graph then misses the budget (what
    # is live beside a segment, which its estimate leaves out), a tail whose segments are the miss lower, at most
    # TAIL_TRIES times; then the lowest-memory tail. (Straight to the lowest one, the medium HunyuanVideo decode
    # half-way between its floor and eager ran its floor's plan, 128 bands, predicted twice the time of its own.)
    goal = None if budget_bytes is None else budget_bytes - base.weight_bytes
    tries = 0
    while True:
        work = first if tries == 0 else copy_graph_module(gm)[0]
        choices = choose_tail(analysis if tries == 0 else RowAnalysis(work, costs_for(target)),
                              lambda n: prefix[n.name], goal)
        tries += 1
        result = None
        if choices is not None:
            outline(work, choices)
            grouped, groups, _ = group_operators(work)
            try:
                result = plan_chunks(grouped, groups, budget_bytes, target=target)
            except BudgetError as e:
                miss = (e.min_peak_bytes or 0) - budget_bytes
                if goal is not None and miss > 0 and tries < TAIL_TRIES:
                    # below the largest segment's bytes by the miss: a goal the same tail would still meet
                    # (a segment under it with room to spare) would find it again
                    goal = min(goal, max(c.bytes for c in choices)) - miss
                    continue
        if result is not None:
            break
        if goal is None:
            return None
        goal = None  # the lowest-memory tail
    if budget_bytes is None and (result.timeline.activation_peak_bytes
                                 >= base.timeline.activation_peak_bytes * (1 - ROW_GAIN)):
        return None
    return groups, result, choices, grouped


__all__ = ["PartialGraph", "PlanRequest", "Planned", "fingerprint", "plan", "replay", "stream_tail", "ROW_GAIN",
           "TAIL_TRIES"]
