"""Text reports of plans: baseline vs planned memory, per block, and the sliced groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tabulate import tabulate

from passes.memory import MemoryTimeline, format_bytes

if TYPE_CHECKING:
    from fxstream.module import CompiledEntry


def block_table(baseline: MemoryTimeline, planned: MemoryTimeline) -> str:
    """Per-block activation peaks side by side."""
    planned_by = {b.block: b.peak_bytes for b in planned.blocks}
    rows = []
    for b in baseline.blocks:
        p = planned_by.get(b.block)
        rows.append([b.block, format_bytes(b.peak_bytes), format_bytes(p) if p is not None else "-",
                     f"{p / b.peak_bytes:.2f}" if p and b.peak_bytes else "-"])
    return tabulate(rows, headers=["block", "baseline peak", "planned peak", "ratio"], tablefmt="github")


def plan_report(entry: CompiledEntry) -> str:
    plan = entry.plan
    lines = [
        f"signature: {plan.signature}",
        tabulate(
            [
                ["weights", format_bytes(plan.weight_bytes), format_bytes(plan.weight_bytes)],
                ["activation peak", format_bytes(plan.baseline_activation_peak_bytes),
                 format_bytes(plan.predicted_activation_peak_bytes)],
                ["total peak", format_bytes(plan.baseline_peak_bytes), format_bytes(plan.predicted_peak_bytes)],
            ],
            headers=["", "baseline (eager)", "planned"],
            tablefmt="github",
        ),
        f"budget: {format_bytes(plan.budget_bytes) if plan.budget_bytes else 'minimum'}; planned peak at "
        f"'{plan.peak_node}' in '{plan.peak_module_path or '<top level>'}'",
        f"{len(plan.sliced_groups)} of {plan.candidate_groups} operator groups sliced; "
        f"{plan.split_reductions} GroupNorms split into exact statistics + apply",
        "",
        block_table(entry.baseline, entry.planned),
    ]
    if plan.sliced_groups:
        rows = [[g.name, g.kind, g.axis, g.length, g.slices, g.nodes, format_bytes(g.intermediate_bytes)]
                for g in sorted(plan.sliced_groups, key=lambda g: -g.intermediate_bytes)[:15]]
        lines += ["", tabulate(rows, headers=["group", "kind", "axis", "length", "slices", "nodes", "intermediates"],
                               tablefmt="github")]
    return "\n".join(lines)
