"""Text reports of memory timelines and plans: totals, the peak and what is live there, blocks, groups.

Each table is its own function so that ``StreamlinedModule.report()`` and the CLI compose the same pieces.
Totals follow the :class:`~passes.plan.Plan` and the budget: weights + activation peak. Graph inputs are held
by the caller before the call and are shown apart.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tabulate import tabulate

from passes.memory import TOP_LEVEL, MemoryTimeline, format_bytes
from passes.plan import Plan

if TYPE_CHECKING:
    from fxstream.module import CompiledEntry

TABLE_FORMAT = "github"


# What each kind of operator group is sliced along, in the user's words (passes.chains._group_kind).
AXIS_WORDS = {"spatial": "frames", "temporal": "pixels", "rows": "rows", "keys": "keys (chunks)"}


def where(timeline: MemoryTimeline, verbose: bool = True) -> str:
    """Where the activation peak of ``timeline`` is: ``in 'module.path'``, or ``at 'node' in 'module.path'`` if
    ``verbose``."""
    module = f"'{timeline.peak_module_path or TOP_LEVEL}'"
    return f"at '{timeline.peak_node}' in {module}" if verbose else f"in {module}"


def _made_by(node: str, workspace: bool) -> str:
    """A graph node's name in words: the op that made the tensor (``linear_93`` -> ``linear``), or a sliced
    group's output or workspace."""
    if node.startswith("sliced_"):
        return "sliced group's workspace" if workspace else "sliced group's output"
    if node.startswith("rows_"):
        return "row-streamed segment's workspace" if workspace else "row-streamed segment's output"
    base = re.sub(r"_\d+$", "", node)
    return base + (" workspace" if workspace else "")


def total_bytes(timeline: MemoryTimeline) -> int:
    """Weights + activation peak: what a budget bounds."""
    return timeline.weight_bytes + timeline.activation_peak_bytes


def summary_table(baseline: MemoryTimeline, plan: Plan | None = None) -> str:
    """Weights, activation peak and total: the baseline alone, or beside the plan's prediction."""
    if plan is None:
        rows = [
            ["weights", format_bytes(baseline.weight_bytes)],
            ["activation peak", format_bytes(baseline.activation_peak_bytes)],
            ["total (weights + activations)", format_bytes(total_bytes(baseline))],
        ]
        return tabulate(rows, headers=["", "baseline (eager)"], tablefmt=TABLE_FORMAT)
    rows = [
        ["weights", format_bytes(plan.weight_bytes), format_bytes(plan.weight_bytes)],
        ["activation peak", format_bytes(plan.baseline_activation_peak_bytes),
         format_bytes(plan.predicted_activation_peak_bytes)],
        ["total peak", format_bytes(plan.baseline_peak_bytes), format_bytes(plan.predicted_peak_bytes)],
    ]
    if plan.predicted_slowdown is not None:
        rows.append(["time (predicted)", format_seconds(plan.baseline_seconds),
                     f"{format_seconds(plan.predicted_seconds)} ({plan.predicted_slowdown:.2f}x)"])
    return tabulate(rows, headers=["", "baseline (eager)", "planned"], tablefmt=TABLE_FORMAT)


def time_line(plan: Plan) -> str:
    """Where the predicted times come from (the device cost table), or "" without a prediction."""
    if plan.predicted_slowdown is None:
        return ""
    return f"predicted time: the time model with the cost table of {plan.time_model}"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def live_table(timeline: MemoryTimeline, top: int = 10, verbose: bool = True) -> str:
    """The largest storages live at the activation peak, with the module that produced each and the op (the
    graph node's name if ``verbose``)."""
    peak = timeline.activation_peak_bytes
    rows = [
        [x.node + (" (workspace)" if x.workspace else "") if verbose else _made_by(x.node, x.workspace),
         x.module_path or TOP_LEVEL, "x".join(map(str, x.shape)) or "-", x.dtype or "-", format_bytes(x.nbytes),
         f"{x.nbytes / peak:.0%}" if peak else "-"]
        for x in timeline.live_at_peak[:top]
    ]
    return tabulate(rows, headers=["tensor" if verbose else "made by", "module", "shape", "dtype", "bytes",
                                   "of peak"], tablefmt=TABLE_FORMAT)


def block_table(baseline: MemoryTimeline, planned: MemoryTimeline | None = None, verbose: bool = True) -> str:
    """Per-block activation peaks: the baseline's (with the node if ``verbose``), or side by side with the
    planned ones."""
    if planned is None:
        if not verbose:
            rows = [[b.block, format_bytes(b.peak_bytes)] for b in baseline.blocks]
            return tabulate(rows, headers=["block", "activation peak"], tablefmt=TABLE_FORMAT)
        rows = [[b.block, format_bytes(b.peak_bytes), b.node] for b in baseline.blocks]
        return tabulate(rows, headers=["block", "activation peak", "at node"], tablefmt=TABLE_FORMAT)
    planned_by = {b.block: b.peak_bytes for b in planned.blocks}
    rows = []
    for b in baseline.blocks:
        p = planned_by.get(b.block)
        rows.append([b.block, format_bytes(b.peak_bytes), format_bytes(p) if p is not None else "-",
                     f"{p / b.peak_bytes:.2f}" if p and b.peak_bytes else "-"])
    return tabulate(rows, headers=["block", "baseline peak", "planned peak", "ratio"], tablefmt=TABLE_FORMAT)


def groups_table(plan: Plan, top: int = 15, verbose: bool = True) -> str:
    """The sliced operator groups, largest first (by the bytes of all the values each computes)."""
    ordered = sorted(plan.sliced_groups, key=lambda g: -g.intermediate_bytes)[:top]
    if verbose:
        rows = [[g.name, g.kind, g.axis, g.length, g.slices, g.nodes, format_bytes(g.intermediate_bytes)]
                for g in ordered]
        return tabulate(rows, headers=["group", "kind", "axis", "length", "slices", "nodes", "intermediates"],
                        tablefmt=TABLE_FORMAT)
    rows = [[g.name, AXIS_WORDS.get(g.kind, g.axis), f"{g.slices} of {g.length}", g.nodes,
             format_bytes(g.intermediate_bytes)] for g in ordered]
    return tabulate(rows, headers=["runs in", "sliced along", "slices", "ops", "values computed"],
                    tablefmt=TABLE_FORMAT)


def budget_line(plan: Plan) -> str:
    return (f"budget: {format_bytes(plan.budget_bytes) if plan.budget_bytes else 'minimum'}; planned peak at "
            f"'{plan.peak_node}' in '{plan.peak_module_path or '<top level>'}'")


def groups_line(plan: Plan) -> str:
    keyed = sum(1 for g in plan.groups if g.kind == "keys")
    return (f"{len(plan.sliced_groups) - keyed} of {plan.candidate_groups} operator groups sliced; "
            f"{plan.split_reductions} GroupNorms split into exact statistics + apply"
            + (f"; {keyed} attentions make their keys and values chunk by chunk" if keyed else ""))


def plan_report(entry: CompiledEntry) -> str:
    """Baseline vs planned totals, budget, per-block peaks and sliced groups of one compiled signature."""
    plan = entry.plan
    lines = [
        f"signature: {plan.signature}",
        summary_table(entry.baseline, plan),
        *([time_line(plan)] if time_line(plan) else []),
        budget_line(plan),
        groups_line(plan),
        "",
        block_table(entry.baseline, entry.planned),
    ]
    if plan.sliced_groups:
        lines += ["", groups_table(plan)]
    return "\n".join(lines)
