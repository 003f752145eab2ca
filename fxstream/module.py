"""StreamlinedModule: the drop-in replacement ``fxstream.compile`` returns.

It is called exactly like the original module and returns the same types. On the first call with a new input
signature (tensor shapes, dtypes and devices, and the values of non-tensor arguments) it captures the module,
groups its operators, chooses slice counts for the budget and keeps the sliced GraphModule; later calls with
that signature reuse it. Attributes the module does not have (``config``, ``dtype``, ``device``...) are read
from the original, whose parameters it shares.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from fxstream.capture import TIMESTEP_NAMES, capture, normalize_inputs
from fxstream.errors import BudgetError
from fxstream.runtime.rehash import RehashConfig, RehashController
from fxstream.runtime.sliced import slice_bounds
from passes.budget import BudgetResult, forced_chunks, plan_chunks
from passes.chains import OperatorGroup, find_groups, tensor_bytes
from passes.memory import MemoryTimeline, analyze_memory, format_bytes
from passes.plan import GroupPlan, Plan
from passes.rehash import FeatureCache
from passes.rows import RowAnalysis, choose_tail, outline
from passes.slicing import copy_graph_module

# The minimum-memory plan streams the tail by rows only when that lowers the predicted peak by this fraction:
# the recomputation of halos and statistics passes is not worth less.
ROW_GAIN = 0.05


@dataclass
class CompiledEntry:
    """One input signature's compiled graph and what was decided for it."""

    graph_module: torch.fx.GraphModule
    plan: Plan
    baseline: MemoryTimeline
    planned: MemoryTimeline
    compile_seconds: float
    partial: PartialEntry | None = None  # the rehash step's graph, when Step Rehash is on


def signature_of(args: tuple) -> tuple:
    """A hashable key of the normalised call: tensors by shape, dtype and device; other values by repr."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append(("T", tuple(a.shape), str(a.dtype), str(a.device)))
        else:
            key.append(("V", repr(a)))
    return tuple(key)


def describe_signature(args: tuple) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


def _axis_text(group: OperatorGroup) -> str:
    axis = next(a for a in (group.axes[o] for o in group.nodes) if hasattr(a, "dim"))
    return f"dim {axis.dim}" + (f" x{axis.unit}" if axis.unit != 1 else "")


@dataclass
class PartialEntry:
    """The rehash step's graph for one input signature (see :mod:`passes.rehash`)."""

    graph_module: torch.fx.GraphModule
    planned: MemoryTimeline
    chunks: dict[str, int]


def build_plan(
    module: nn.Module,
    args: tuple,
    *,
    budget_bytes: int | None,
    chunks: int | None = None,
    target: str | None = None,
    kwargs: dict | None = None,
    rehash: RehashConfig | None = None,
    cache: FeatureCache | None = None,
) -> CompiledEntry:
    """Capture ``module`` on normalised ``args`` (and keyword-only ``kwargs``) and slice it for the budget (or
    ``chunks`` everywhere). With ``rehash``, the full graph stores the cache point's value in ``cache`` and a
    partial graph for rehash steps is built and sliced under the same budget."""
    start = time.perf_counter()
    gm = capture(module, *args, **(kwargs or {}))
    target = target or _target_of(args)
    baseline = analyze_memory(gm, lifetime="eager", target=target)
    rehash_info = None
    partial_entry = None
    if rehash is not None:
        from passes import rehash as rehash_pass

        point = rehash_pass.resolve(gm, rehash.cache_point)
        cache = cache if cache is not None else rehash_pass.FeatureCache()
        partial_gm = rehash_pass.partial_graph(gm, point.node, cache)
        gm = rehash_pass.full_graph(gm, point.node, cache)
        _, p_result, _ = _slice(partial_gm, budget_bytes, chunks, target)
        partial_entry = PartialEntry(p_result.graph_module, p_result.timeline, dict(p_result.chunks))
        rehash_info = dict(
            cache_point=point.path, module_class=point.module_class, node=point.node,
            skipped_fraction=point.skipped_fraction, cached_bytes=point.nbytes,
            flops_full=point.flops_full, flops_partial=point.flops_partial,
            partial_predicted_activation_peak_bytes=p_result.timeline.activation_peak_bytes,
            partial_sliced_groups=sum(1 for k in p_result.chunks.values() if k > 1),
            config=rehash.to_dict(),
        )
    groups, result, streamed = _slice(gm, budget_bytes, chunks, target)
    split = sum(1 for n in gm.graph.nodes if n.target is torch.ops.fxstream.group_norm_partial.default)
    if streamed:  # planned on a copy: its split GroupNorms, and those the row segments compute in passes
        split = sum(1 for n in result.graph_module.graph.nodes
                    if n.target is torch.ops.fxstream.group_norm_partial.default)
        split += sum(len(c.segment.norms) for c in streamed)
    planned = result.timeline
    activation_peak = planned.activation_peak_bytes
    if partial_entry is not None:
        activation_peak = max(activation_peak, partial_entry.planned.activation_peak_bytes)
    plan = Plan(
        groups=[
            GroupPlan(
                name=g.name,
                kind=g.kind,
                axis=_axis_text(g),
                length=g.length,
                slices=len(slice_bounds(g.length, result.chunks.get(g.name, 1))),
                nodes=len(g.nodes),
                intermediate_bytes=g.intermediate_bytes(),
            )
            for g in groups
            if result.chunks.get(g.name, 1) > 1
        ] + [
            GroupPlan(
                name=c.segment.name,
                kind="rows",
                axis=f"rows (dim {c.segment.row_dim[c.segment.output]}), {c.segment.num_passes} passes",
                length=c.segment.length,
                slices=c.bands,
                nodes=len(c.segment.nodes),
                intermediate_bytes=sum(tensor_bytes(n.meta.get("val")) for n in c.segment.nodes),
            )
            for c in streamed
        ],
        predicted_peak_bytes=result.weight_bytes + activation_peak,
        predicted_activation_peak_bytes=activation_peak,
        baseline_peak_bytes=baseline.weight_bytes + baseline.activation_peak_bytes,
        baseline_activation_peak_bytes=baseline.activation_peak_bytes,
        weight_bytes=result.weight_bytes,
        budget_bytes=budget_bytes,
        peak_node=planned.peak_node,
        peak_module_path=planned.peak_module_path,
        target=target,
        signature=describe_signature(args),
        candidate_groups=len(groups),
        split_reductions=split,
        rehash=rehash_info,
    )
    return CompiledEntry(result.graph_module, plan, baseline, planned, time.perf_counter() - start, partial_entry)


def _slice(gm: torch.fx.GraphModule, budget_bytes: int | None, chunks: int | None,
           target: str, rows: bool = True) -> tuple[list[OperatorGroup], BudgetResult, list]:
    """Group ``gm``'s operators (in place) and choose slice counts: ``chunks`` everywhere, or for the budget.

    When the budget is out of reach of operator groups alone (or for the minimum), the graph's tail is
    row-streamed (:mod:`passes.rows`) where that lowers the peak; the third value lists the streamed segments.
    """
    pristine = copy_graph_module(gm)[0] if rows and chunks is None else None
    groups = find_groups(gm)
    if chunks is not None:
        return groups, forced_chunks(gm, groups, chunks, target=target), []
    try:
        result, error = plan_chunks(gm, groups, budget_bytes, target=target), None
    except BudgetError as e:
        result, error = None, e
    if pristine is not None and (result is None or budget_bytes is None):
        streamed = _stream_tail(pristine, budget_bytes, target, result)
        if streamed is not None:
            return streamed
        if result is None:
            lowest = _stream_tail(pristine, None, target, None)
            if lowest is not None:  # the floor the error reports is the one row streaming reaches
                t = lowest[1]
                floor = t.weight_bytes + t.timeline.activation_peak_bytes
                raise BudgetError(
                    f"budget {format_bytes(budget_bytes)} is below the smallest peak slicing can reach, "
                    f"{format_bytes(floor)} (weights {format_bytes(t.weight_bytes)} + activations "
                    f"{format_bytes(t.timeline.activation_peak_bytes)}), bounded at node "
                    f"'{t.timeline.peak_node}' in '{t.timeline.peak_module_path or '<top level>'}'",
                    min_peak_bytes=floor, bounding_node=t.timeline.peak_node,
                ) from error
    if result is None:
        raise error
    return groups, result, []


def _stream_tail(gm: torch.fx.GraphModule, budget_bytes: int | None, target: str,
                 base: BudgetResult | None) -> tuple[list[OperatorGroup], BudgetResult, list] | None:
    """Plan a copy of ``gm`` with its tail row-streamed (:mod:`passes.rows`); None when that does not help.

    Under a budget, first the streamed tail with the least recomputation that fits, then the lowest-memory
    one; without a budget, the lowest-memory one, kept only if it lowers the peak by ``ROW_GAIN``.
    """
    first = copy_graph_module(gm)[0]
    analysis = RowAnalysis(first)
    if not analysis.cut_points():
        return None
    if base is None:
        probe = copy_graph_module(gm)[0]
        base = plan_chunks(probe, find_groups(probe), None, target=target)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    at = [0] * (len(order) + 1)  # the base plan's peak live bytes at each original position
    position = 0
    for name, live in zip(base.timeline.nodes, base.timeline.live_bytes):
        position = max(position, order.get(name, position))
        at[position] = max(at[position], live)
    prefix, running = {}, 0
    for n in gm.graph.nodes:  # the peak before each node
        prefix[n.name] = running
        running = max(running, at[order[n.name]])
    goals = [None] if budget_bytes is None else [budget_bytes - base.weight_bytes, None]
    for i, goal in enumerate(goals):
        work = first if i == 0 else copy_graph_module(gm)[0]
        choices = choose_tail(analysis if i == 0 else RowAnalysis(work), lambda n: prefix[n.name], goal)
        if choices is None:
            continue
        outline(work, choices)
        groups = find_groups(work)
        try:
            result = plan_chunks(work, groups, budget_bytes, target=target)
        except BudgetError:
            continue
        if budget_bytes is None and (result.timeline.activation_peak_bytes
                                     >= base.timeline.activation_peak_bytes * (1 - ROW_GAIN)):
            return None
        return groups, result, choices
    return None


def _timestep_index(module: nn.Module) -> int | None:
    """Position of the timestep argument in the normalised call (see ``normalize_inputs``)."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    for name in TIMESTEP_NAMES:
        if name in params:
            return params.index(name)
    return None


def _target_of(args: tuple) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return "cuda" if a.device.type in ("cuda", "meta") else "cpu"
    return "cpu"


class StreamlinedModule(nn.Module):
    """A module compiled by fxstream: same call, same outputs, less memory. See :func:`fxstream.compile`."""

    def __init__(self, module: nn.Module, *, budget_bytes: int | None, chunks: int | None, target: str | None,
                 rehash: RehashConfig | None = None):
        super().__init__()
        self.original = module
        self._fx_budget_bytes = budget_bytes
        self._fx_chunks = chunks
        self._fx_target = target
        self._fx_cache: dict[tuple, CompiledEntry] = {}
        self._fx_last: CompiledEntry | None = None
        self._fx_rehash = RehashController(rehash) if rehash is not None else None
        self._fx_timestep_index = _timestep_index(module)

    # -- calling -----------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat, extra = normalize_inputs(self.original, args, kwargs)
        key = signature_of(flat) + signature_of(tuple(extra.items()))
        entry = self._fx_cache.get(key)
        if entry is None:
            # compiling is not part of the call: a dispatch mode watching the call (fxstream.measure) must not
            # see the tracer's tensors
            rehash = self._fx_rehash
            with _disable_current_modes():
                entry = build_plan(
                    self.original, flat, budget_bytes=self._fx_budget_bytes, chunks=self._fx_chunks,
                    target=self._fx_target, kwargs=extra,
                    rehash=rehash.config if rehash is not None else None,
                    cache=rehash.cache if rehash is not None else None,
                )
            self._fx_cache[key] = entry
        self._fx_last = entry
        if self._fx_rehash is None or entry.partial is None:
            return entry.graph_module(*flat, **extra)
        timestep = flat[self._fx_timestep_index] if self._fx_timestep_index is not None else None
        full = self._fx_rehash.next_call(timestep, key)
        graph_module = entry.graph_module if full else entry.partial.graph_module
        return graph_module(*flat, **extra)

    # -- Step Rehash -------------------------------------------------------------------------------------------
    @property
    def rehash(self) -> RehashController | None:
        """The Step Rehash controller (None when rehash is off): ``reset()``, ``set_step(i)``, ``history``."""
        return self._fx_rehash

    # -- what was decided --------------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        """The Plan of the most recent call's input signature (None before the first call)."""
        return self._fx_last.plan if self._fx_last else None

    @property
    def compiled(self) -> CompiledEntry | None:
        return self._fx_last

    def report(self) -> str:
        """Baseline (eager) vs planned memory, per block, for the most recent input signature."""
        from fxstream.report import plan_report

        if self._fx_last is None:
            return "not compiled yet: call the module once"
        text = plan_report(self._fx_last)
        print(text)
        return text

    # -- drop-in attributes ------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self._modules.get("original")
            if original is None:
                raise
            return getattr(original, name)

    def extra_repr(self) -> str:
        budget = "minimum" if self._fx_budget_bytes is None else format_bytes(self._fx_budget_bytes)
        text = f"budget={budget}, compiled_signatures={len(self._fx_cache)}"
        if self._fx_rehash is not None:
            text += f", rehash={self._fx_rehash.config.cache_point}: {self._fx_rehash.config.schedule.describe()}"
        return text
