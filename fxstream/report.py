"""Text reports of memory timelines and plans: totals, the peak and what is live there, blocks, groups.

Each table is its own function so that ``StreamlinedModule.report()`` and the CLI compose the same pieces.
Totals follow the :class:`~passes.plan.Plan` and the budget: weights + activation peak. Graph inputs are held
by the caller before the call and are shown apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tabulate import tabulate

from passes.memory import TOP_LEVEL, MemoryTimeline, format_bytes
from passes.plan import Plan

if TYPE_CHECKING:
    from fxstream.module import CompiledEntry

TABLE_FORMAT = "github"


def where(timeline: MemoryTimeline) -> str:
    """``node in module.path``: where the activation peak of ``timeline`` is."""
    return f"'{timeline.peak_node}' in '{timeline.peak_module_path or TOP_LEVEL}'"


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
    return tabulate(rows, headers=["", "baseline (eager)", "planned"], tablefmt=TABLE_FORMAT)


def live_table(timeline: MemoryTimeline, top: int = 10) -> str:
    """The largest storages live at the activation peak, with the node and module that produced each."""
    peak = timeline.activation_peak_bytes
    rows = [
        [x.node + (" (workspace)" if x.workspace else ""), x.module_path or TOP_LEVEL,
         "x".join(map(str, x.shape)) or "-", x.dtype or "-", format_bytes(x.nbytes),
         f"{x.nbytes / peak:.0%}" if peak else "-"]
        for x in timeline.live_at_peak[:top]
    ]
    return tabulate(rows, headers=["tensor", "module", "shape", "dtype", "bytes", "of peak"],
                    tablefmt=TABLE_FORMAT)


def block_table(baseline: MemoryTimeline, planned: MemoryTimeline | None = None) -> str:
    """Per-block activation peaks: the baseline's (with the node), or side by side with the planned ones."""
    if planned is None:
        rows = [[b.block, format_bytes(b.peak_bytes), b.node] for b in baseline.blocks]
        return tabulate(rows, headers=["block", "activation peak", "at node"], tablefmt=TABLE_FORMAT)
    planned_by = {b.block: b.peak_bytes for b in planned.blocks}
    rows = []
    for b in baseline.blocks:
        p = planned_by.get(b.block)
        rows.append([b.block, format_bytes(b.peak_bytes), format_bytes(p) if p is not None else "-",
                     f"{p / b.peak_bytes:.2f}" if p and b.peak_bytes else "-"])
    return tabulate(rows, headers=["block", "baseline peak", "planned peak", "ratio"], tablefmt=TABLE_FORMAT)


def groups_table(plan: Plan, top: int = 15) -> str:
    """The sliced operator groups, largest intermediates first."""
    rows = [[g.name, g.kind, g.axis, g.length, g.slices, g.nodes, format_bytes(g.intermediate_bytes)]
            for g in sorted(plan.sliced_groups, key=lambda g: -g.intermediate_bytes)[:top]]
    return tabulate(rows, headers=["group", "kind", "axis", "length", "slices", "nodes", "intermediates"],
                    tablefmt=TABLE_FORMAT)


def budget_line(plan: Plan) -> str:
    return (f"budget: {format_bytes(plan.budget_bytes) if plan.budget_bytes else 'minimum'}; planned peak at "
            f"'{plan.peak_node}' in '{plan.peak_module_path or '<top level>'}'")


def groups_line(plan: Plan) -> str:
    return (f"{len(plan.sliced_groups)} of {plan.candidate_groups} operator groups sliced; "
            f"{plan.split_reductions} GroupNorms split into exact statistics + apply")


def plan_report(entry: CompiledEntry) -> str:
    """Baseline vs planned totals, budget, per-block peaks and sliced groups of one compiled signature."""
    plan = entry.plan
    lines = [
        f"signature: {plan.signature}",
        summary_table(entry.baseline, plan),
        budget_line(plan),
        groups_line(plan),
        "",
        block_table(entry.baseline, entry.planned),
    ]
    if plan.sliced_groups:
        lines += ["", groups_table(plan)]
    return "\n".join(lines)
