"""Pictures of what fxstream sees and decides: the grouped graph, the memory timeline, step similarity.

    gm, groups, _ = passes.chains.group_operators(fxstream.capture(module, *args))  # as the planner groups
    graph_figure(gm, groups, entry.plan)        # operator groups coloured by kind, with slice counts
    graph_figure(gm, groups, entry.plan, level="ops", within="down_blocks.0.resnets.0.temporal_res_block")
    memory_timeline_figure(entry.baseline, entry.planned, budget_bytes=..., graph_module=entry.graph_module)
    step_similarity_figure(similarity, key_steps)

Every function returns a :class:`matplotlib.figure.Figure` drawn with the Agg canvas and no pyplot state, so
scripts save it (``fig.savefig("timeline.png")``), notebooks display it, and nothing is left open. The artists
a reader (or a test) looks for carry a gid: ``group:<kind>:sliced`` / ``group:<kind>:whole`` / ``unsliced``
node collections, ``block`` nodes, ``baseline`` / ``planned`` / ``budget`` lines, ``peak:<which>`` markers,
``key-steps`` markers.

matplotlib is an optional dependency (``pip install 'fxstream[viz]'``); it is imported when this module is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import matplotlib
import matplotlib.colors as mcolors
import networkx as nx
import numpy as np
import torch.fx
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from passes.chains import OperatorGroup
from passes.meta import module_path, tensor_bytes
from passes.memory import TOP_LEVEL, MemoryTimeline, format_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from passes.plan import Plan

# Fill colours per group kind; "unsliced" is every operator that belongs to no group.
KIND_COLORS = {"spatial": "#4C72B0", "temporal": "#DD8452", "other": "#55A868", "unsliced": "#B8B8B8"}
KINDS = tuple(KIND_COLORS)
# Groups the plan runs whole are drawn in their kind's colour mixed this far towards white.
WHOLE_LIGHTEN = 0.6
BASELINE_COLOR = "#6E6E6E"
PLANNED_COLOR = "#1F63B4"
BUDGET_COLOR = "#C8102E"
LEVELS = ("ops", "groups", "blocks")
# level="auto" draws one node per group up to this many groups (the tiny and medium zoo models), and
# collapses to one row per block above it (a full-size UNet has several hundred groups).
AUTO_MAX_GROUPS = 200
# Figure geometry, in inches per node / row, chosen so labels at 7 pt do not overlap.
_GROUP_DX, _ROW_DY = 0.34, 0.46
_OP_DX, _OP_DY = 1.05, 0.95
_CHAR_WIDTH_IN = 0.085  # a 7-pt monospace character, with some margin: room for the row names
# Long edges (across rows, or between blocks that are not neighbours) carrying less than this fraction of the
# largest such edge's bytes are not drawn: the timestep embedding feeds every ResBlock and would hide the
# skip connections, which carry full activation maps.
FAR_EDGE_MIN_FRACTION = 0.05
# Blocks narrower than this fraction of the graph are shaded but not named on the timeline (their names
# would overlap; the per-block bars below name every block).
MIN_NAMED_BLOCK_SPAN = 0.015
# Per-block bars are labelled with planned / baseline only for blocks at least this fraction of the largest.
RATIO_MIN_FRACTION = 0.05
_BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


@dataclass
class GraphUnit:
    """A node of a :func:`group_graph`: an operator group, a run of ungrouped operators, a block or an op."""

    name: str
    kind: str  # one of KINDS
    slices: int  # 1: runs whole
    row: str  # the module row it is drawn in (groups level) or its block (blocks level)
    order: int  # position of its first operator in the graph
    ops: list[str] = field(default_factory=list)  # the fx node names it stands for
    group: str | None = None  # the operator group it belongs to (ops level) or is (groups level)
    op: str = ""  # ops level: the operator, e.g. "conv3d" or "group_norm_partial"
    shape: str = ""  # ops level: the output shape, e.g. "2x32x4x16x16"
    group_pass: int = 0  # ops level: which pass over the slices computes it (split reductions: > 0)
    kind_ops: Counter = field(default_factory=Counter)  # blocks level: operators per kind
    kind_groups: Counter = field(default_factory=Counter)  # blocks level: groups per kind
    sliced_groups: int = 0  # blocks level
    max_slices: int = 1  # blocks level


# ----------------------------------------------------------------------------------------------- the graph


def group_graph(
    gm: torch.fx.GraphModule,
    groups: Sequence[OperatorGroup],
    plan: Plan | Mapping[str, int] | None = None,
    *,
    level: str = "groups",
    within: str | None = None,
) -> nx.DiGraph:
    """The graph ``gm`` drawn by :func:`graph_figure`, as a networkx DiGraph of :class:`GraphUnit` s.

    Args:
        gm: the GraphModule ``groups`` were found in (:func:`passes.chains.group_operators`).
        groups: its operator groups.
        plan: the Plan made for the same model and inputs, or its slice counts by group name (the
            ``chunks`` of :func:`passes.budget.plan_chunks`); groups it does not list run whole. None: nothing
            is sliced.
        level: ``"groups"``: one node per operator group and one per run of consecutive ungrouped operators
            in a module row; ``"blocks"``: one node per top-level block (``down_blocks.0``, ``mid_block``...);
            ``"ops"``: one node per ATen operator.
        within: keep only operators in this module and below (a module path, e.g.
            ``"down_blocks.0.resnets.0.temporal_res_block"``); a group is kept when any of its operators is.

    Each node's ``unit`` attribute is its :class:`GraphUnit`; an edge means values flow between two units, and
    its ``bytes`` attribute is their size.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    slices = _slice_counts(plan)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]  # not export's _guards_fn module
    paths = {n: module_path(n) for n in calls}
    prefix = _wrapper_prefix(list(paths.values()))
    inside = [n for n in calls if _is_within(paths[n], within)]
    if within and not inside:
        raise ValueError(f"within={within!r}: no operator of the graph runs in that module")
    group_of = {n: g for g in groups for n in g.nodes}
    order = {n: i for i, n in enumerate(calls)}

    unit_of: dict[torch.fx.Node, str] = {}
    units: dict[str, GraphUnit] = {}
    if level == "ops":
        for n in inside:
            g = group_of.get(n)
            units[n.name] = GraphUnit(
                name=n.name, kind=g.kind if g else "unsliced", slices=slices.get(g.name, 1) if g else 1,
                row=_block(paths[n], prefix), order=order[n], ops=[n.name], group=g.name if g else None,
                op=_op_name(n), shape=_shape_text(n), group_pass=g.passes.get(n, 0) if g else 0,
            )
            unit_of[n] = n.name
    elif level == "groups":
        kept = {group_of[n].name for n in inside if n in group_of}
        run: GraphUnit | None = None
        for n in calls:
            g = group_of.get(n)
            if g is not None and g.name in kept:
                run = None
                if g.name not in units:
                    rows = Counter(_row(paths[m], prefix) for m in g.nodes)
                    units[g.name] = GraphUnit(
                        name=g.name, kind=g.kind, slices=slices.get(g.name, 1), row=rows.most_common(1)[0][0],
                        order=order[n], group=g.name,
                    )
                units[g.name].ops.append(n.name)
                unit_of[n] = g.name
            elif g is None and _is_within(paths[n], within):
                row = _row(paths[n], prefix)
                if run is None or run.row != row:
                    run = GraphUnit(name=f"{row}:{n.name}", kind="unsliced", slices=1, row=row,
                                    order=order[n])
                    units[run.name] = run
                run.ops.append(n.name)
                unit_of[n] = run.name
            else:
                run = None
    else:
        for n in inside:
            block = _block(paths[n], prefix)
            unit = units.setdefault(block, GraphUnit(name=block, kind="unsliced", slices=1, row=block,
                                                     order=order[n]))
            unit.ops.append(n.name)
            g = group_of.get(n)
            unit.kind_ops[_op_kind(g, slices)] += 1
            unit_of[n] = block
        for g in groups:
            members = [n for n in g.nodes if n in unit_of]
            if not members:
                continue
            unit = units[Counter(unit_of[n] for n in members).most_common(1)[0][0]]
            unit.kind_groups[g.kind] += 1
            k = slices.get(g.name, 1)
            unit.sliced_groups += k > 1
            unit.max_slices = max(unit.max_slices, k)
        for unit in units.values():  # a block's colour: the kind most of its operators have
            by_kind: Counter = Counter()
            for segment, count in unit.kind_ops.items():
                by_kind[segment.partition(":")[0]] += count
            unit.kind = by_kind.most_common(1)[0][0] if by_kind else "unsliced"

    graph = nx.DiGraph()
    for unit in sorted(units.values(), key=lambda u: u.order):
        graph.add_node(unit.name, unit=unit)
    for n, src in unit_of.items():
        nbytes = tensor_bytes(n.meta.get("val"))
        for dst in {unit_of.get(user) for user in n.users} - {None, src}:
            if graph.has_edge(src, dst):
                graph.edges[src, dst]["bytes"] += nbytes
            else:
                graph.add_edge(src, dst, bytes=nbytes)
    return graph


def graph_figure(
    gm: torch.fx.GraphModule,
    groups: Sequence[OperatorGroup],
    plan: Plan | Mapping[str, int] | None = None,
    *,
    level: str = "auto",
    within: str | None = None,
    title: str | None = None,
) -> Figure:
    """Draw the captured graph with its operator groups coloured by kind and labelled with their slice counts.

    ``level="groups"``: one row per module (``down_blocks.0.attentions.0``...) in execution order, one node
    per operator group (a number inside: its slice count; pale: the plan runs it whole) and one grey square
    per run of ungrouped operators. ``level="blocks"``: one row per top-level block, a bar of its operators
    by kind and the skip connections between blocks (a group counts in the block holding most of its
    operators).
    ``level="ops"``: every operator (for a zoom with ``within``); split
    GroupNorms (``group_norm_partial`` / ``group_norm_apply``) are drawn as diamonds. ``level="auto"``:
    ``"groups"`` up to :data:`AUTO_MAX_GROUPS` groups, ``"blocks"`` above. See :func:`group_graph` for the
    arguments.
    """
    if level == "auto":
        level = "groups" if len(groups) <= AUTO_MAX_GROUPS else "blocks"
    graph = group_graph(gm, groups, plan, level=level, within=within)
    draw = {"groups": _draw_groups, "blocks": _draw_blocks, "ops": _draw_ops}[level]
    fig = draw(graph)
    if title is None:
        ops = {op for v in graph for op in graph.nodes[v]["unit"].ops}
        shown = {g.name for g in groups if any(n.name in ops for n in g.nodes)}
        slices = _slice_counts(plan)
        title = f"{len(shown)} operator groups" + (f" in {within}" if within else "")
        if plan is not None:
            title += f", {sum(slices.get(g, 1) > 1 for g in shown)} sliced by the plan"
    fig.axes[0].set_title(title, loc="left", fontsize=10)
    return fig


def _draw_groups(graph: nx.DiGraph) -> Figure:
    units = [graph.nodes[v]["unit"] for v in graph]
    rows = list(dict.fromkeys(u.row for u in sorted(units, key=lambda u: u.order)))
    row_index = {r: i for i, r in enumerate(rows)}
    rank: Counter = Counter()
    pos = {}
    for u in sorted(units, key=lambda u: u.order):
        pos[u.name] = (rank[u.row], -row_index[u.row])
        rank[u.row] += 1
    width = max(rank.values(), default=1)
    fig = Figure(figsize=(max(7.0, 3.2 + _GROUP_DX * width), max(2.5, 1.2 + _ROW_DY * len(rows))),
                 layout="constrained")
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        if i % 2:
            ax.axhspan(-i - 0.5, -i + 0.5, color="#F2F2F2", zorder=0)
        ax.text(-0.7, -i, row, ha="right", va="center", fontsize=7, family="monospace")
    _draw_edges(ax, graph, pos, lambda a, b: abs(pos[a][1] - pos[b][1]) <= 1 and pos[b][0] >= pos[a][0])
    _draw_unit_nodes(ax, graph, pos, size=150)
    sliced = {u.name: str(u.slices) for u in units if u.slices > 1}
    texts = nx.draw_networkx_labels(graph, pos, labels=sliced, ax=ax, font_size=6, font_color="white",
                                    font_weight="bold")
    for text in texts.values():
        text.set_gid("slices")
    ax.set_xlim(-0.7 - _CHAR_WIDTH_IN * max(map(len, rows), default=4) / _GROUP_DX, width - 0.3)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.axis("off")
    fig.legend(handles=_kind_legend(units), loc="outside lower center", fontsize=7, ncols=4, frameon=False)
    return fig


def _draw_blocks(graph: nx.DiGraph) -> Figure:
    units = [graph.nodes[v]["unit"] for v in graph]
    n = len(units)
    fig = Figure(figsize=(11.0, max(2.5, 1.3 + 0.36 * n)), layout="constrained")
    ax = fig.add_subplot()
    most = max((len(u.ops) for u in units), default=1)
    # the bars start at x=0; the block nodes sit left of them, with skip connections arcing further left
    node_x = -0.06 * most
    pos = {u.name: (node_x, -i) for i, u in enumerate(units)}
    segments = [f"{k}:sliced" for k in KINDS[:3]] + [f"{k}:whole" for k in KINDS[:3]] + ["unsliced"]
    for i, u in enumerate(units):
        left = 0
        for seg in segments:
            count = u.kind_ops.get(seg, 0)
            if count:
                ax.barh(-i, count, left=left, height=0.62, color=_segment_color(seg), edgecolor="white",
                        linewidth=0.4, gid=f"bar:{seg}")
                left += count
        groups = sum(u.kind_groups.values())
        kinds = ", ".join(f"{u.kind_groups[k]} {k}" for k in KINDS[:3] if u.kind_groups[k])
        sliced = f"; {u.sliced_groups} sliced, up to x{u.max_slices}" if u.sliced_groups else ""
        mine = f"{_plural(groups, 'group')} ({kinds}){sliced}" if groups else "no group of its own"
        summary = f"{_plural(len(u.ops), 'op')}; {mine}"
        ax.text(left + most * 0.01, -i, summary, va="center", fontsize=7)
    skips = _heavy(graph, [(a, b) for a, b in graph.edges if abs(pos[a][1] - pos[b][1]) > 1])
    nx.draw_networkx_edges(graph, pos, edgelist=skips, ax=ax, arrows=True, arrowstyle="-|>", arrowsize=7,
                           edge_color="#8A8A8A", width=0.8, connectionstyle="arc3,rad=0.35", node_size=60)
    nodes = nx.draw_networkx_nodes(graph, pos, ax=ax, node_size=60, linewidths=0.5, edgecolors="#333333",
                                   node_color=[KIND_COLORS[u.kind] for u in units])
    nodes.set_gid("block")
    # networkx hides the tick labels it finds; the block names are the y tick labels
    ax.tick_params(axis="both", which="both", left=False, bottom=True, labelleft=True, labelbottom=True)
    ax.set_yticks([-i for i in range(n)], [u.name for u in units], fontsize=7, family="monospace")
    ax.set_xlim(node_x * 3.2, most * 1.55)  # room for the arcs on the left, the summaries on the right
    ax.set_xlabel("operators", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles = [Patch(color=_segment_color(s), label=s.replace(":", ", ")) for s in segments
               if any(u.kind_ops.get(s) for u in units)]
    ax.legend(handles=handles, loc="lower right", fontsize=7, ncols=2)
    return fig


def _draw_ops(graph: nx.DiGraph) -> Figure:
    units = {v: graph.nodes[v]["unit"] for v in graph}
    # columns: longest path from a source, so every edge points right
    depth: dict[str, int] = {}
    for v in nx.topological_sort(graph):
        depth[v] = max((depth[p] + 1 for p in graph.predecessors(v)), default=0)
    columns: dict[int, list[str]] = {}
    for v in sorted(graph, key=lambda v: units[v].order):
        columns.setdefault(depth[v], []).append(v)
    pos = {}
    for x, members in columns.items():
        for j, v in enumerate(members):
            pos[v] = (x, (len(members) - 1) / 2 - j)
    tallest = max((len(m) for m in columns.values()), default=1)
    fig = Figure(figsize=(max(7.0, 1.5 + _OP_DX * len(columns)), max(3.0, 2.4 + _OP_DY * tallest)),
                 layout="constrained")
    ax = fig.add_subplot()
    _draw_edges(ax, graph, pos, lambda a, b: True, arrows=True)
    _draw_unit_nodes(ax, graph, pos, size=260, split_shape="D")
    group_names = list(dict.fromkeys(u.group for u in units.values() if u.group))
    outline = {g: matplotlib.colormaps["tab10"](i % 10) for i, g in enumerate(group_names)}
    for v, (x, y) in pos.items():
        u = units[v]
        ax.text(x, y - 0.2, u.op, ha="center", va="top", fontsize=6.5,
                fontweight="bold" if u.op.startswith("group_norm_") else "normal")
        ax.text(x, y - 0.36, u.shape, ha="center", va="top", fontsize=5.5, color="#555555")
        if u.group_pass:
            ax.text(x, y + 0.2, f"pass {u.group_pass}", ha="center", va="bottom", fontsize=5.5)
        if u.group:
            ax.scatter([x], [y], s=420, facecolors="none", edgecolors=[outline[u.group]], linewidths=1.4,
                       zorder=1)
    handles = _kind_legend(list(units.values()), numbered=False)
    for g in group_names:
        u = next(u for u in units.values() if u.group == g)
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markersize=9,
                              markeredgecolor=outline[g], label=f"group {g}: {u.kind}, x{u.slices}"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.02), fontsize=7, ncols=2,
              frameon=False)
    ax.set_xlim(-0.7, max(columns, default=0) + 0.7)
    ax.set_ylim(-tallest / 2 - 0.2, tallest / 2 + 0.1)
    ax.axis("off")
    return fig


def _draw_edges(ax: Axes, graph: nx.DiGraph, pos: dict, near, *, arrows: bool = False) -> None:
    """Edges between neighbours dark, long ones (skip connections, row changes) faint."""
    near_edges = [(a, b) for a, b in graph.edges if near(a, b)]
    far_edges = _heavy(graph, [(a, b) for a, b in graph.edges if not near(a, b)])
    style = dict(arrows=True, arrowstyle="-|>", arrowsize=8, node_size=260) if arrows else dict(arrows=False)
    for edges, color, alpha in ((near_edges, "#666666", 0.8), (far_edges, "#999999", 0.3)):
        if edges:
            drawn = nx.draw_networkx_edges(graph, pos, edgelist=edges, ax=ax, edge_color=color, alpha=alpha,
                                           width=0.7, **style)
            for artist in drawn if isinstance(drawn, list) else [drawn]:
                artist.set_zorder(0.5)


def _heavy(graph: nx.DiGraph, edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    most = max((graph.edges[e]["bytes"] for e in edges), default=0)
    return [e for e in edges if graph.edges[e]["bytes"] >= FAR_EDGE_MIN_FRACTION * most]


def _draw_unit_nodes(ax: Axes, graph: nx.DiGraph, pos: dict, *, size: float, split_shape: str = "o") -> None:
    """One collection per (kind, sliced or whole): gid ``group:<kind>:<sliced|whole>``, or ``unsliced``."""
    buckets: dict[tuple[str, str], list[str]] = {}
    for v in graph:
        u = graph.nodes[v]["unit"]
        shape = "s" if u.kind == "unsliced" else split_shape if u.op.startswith("group_norm_") else "o"
        state = "sliced" if u.slices > 1 else "whole"
        gid = "unsliced" if u.kind == "unsliced" else f"group:{u.kind}:{state}"
        buckets.setdefault((gid, shape), []).append(v)
    for (gid, shape), nodes in sorted(buckets.items()):
        seg = gid.removeprefix("group:")
        artist = nx.draw_networkx_nodes(
            graph, pos, nodelist=nodes, ax=ax, node_shape=shape, node_color=_segment_color(seg),
            node_size=size * (0.55 if gid == "unsliced" else 1.0), linewidths=1.2 if shape == "D" else 0.4,
            edgecolors="#222222" if shape == "D" else "#555555",
        )
        artist.set_gid(gid)
        artist.set_zorder(2)


def _kind_legend(units: Sequence[GraphUnit], numbered: bool = True) -> list:
    present = {(u.kind, u.slices > 1) for u in units}
    handles = []
    for kind in KINDS:
        if kind == "unsliced":
            if any(k == kind for k, _ in present):
                handles.append(Line2D([], [], marker="s", linestyle="", color=KIND_COLORS[kind], markersize=6,
                                      label="no group (unsliced)"))
            continue
        for sliced in (True, False):
            if (kind, sliced) in present:
                label = f"{kind}, runs whole"
                if sliced:
                    label = f"{kind}, sliced" + (" (n = slices)" if numbered else "")
                handles.append(Line2D([], [], marker="o", linestyle="", markersize=7, label=label,
                                      color=_segment_color(f"{kind}:{'sliced' if sliced else 'whole'}")))
    return handles


def _segment_color(segment: str) -> str:
    kind, _, state = segment.partition(":")
    rgb = np.array(mcolors.to_rgb(KIND_COLORS[kind]))
    if state == "whole":
        rgb = rgb + (1 - rgb) * WHOLE_LIGHTEN
    return mcolors.to_hex(rgb)


def _op_kind(group: OperatorGroup | None, slices: dict[str, int]) -> str:
    if group is None:
        return "unsliced"
    return f"{group.kind}:{'sliced' if slices.get(group.name, 1) > 1 else 'whole'}"


def _slice_counts(plan: Plan | Mapping[str, int] | None) -> dict[str, int]:
    if plan is None:
        return {}
    if isinstance(plan, Mapping):
        return dict(plan)
    return {g.name: g.slices for g in plan.groups}


def _is_within(path: str, within: str | None) -> bool:
    return not within or path == within or path.startswith(within + ".")


def _wrapper_prefix(paths: list[str]) -> str:
    """The module every operator runs in (a VAE decoder's ``decoder``), so that rows are named below it."""
    parts = [p.split(".") for p in paths if p]
    prefix: list[str] = []
    while parts and all(len(p) > len(prefix) + 1 for p in parts):
        heads = {p[len(prefix)] for p in parts}
        if len(heads) != 1 or any(p[len(prefix) + 1].isdigit() for p in parts):
            break
        prefix.append(heads.pop())
    return ".".join(prefix)


def _split(path: str, prefix: str) -> list[str]:
    if prefix and (path == prefix or path.startswith(prefix + ".")):
        path = path[len(prefix) + 1:]
    return path.split(".") if path else []


def _block(path: str, prefix: str) -> str:
    """``down_blocks.1`` (a ModuleList entry) or ``conv_in``: the top-level block a module path runs in."""
    parts = _split(path, prefix)
    if not parts:
        return TOP_LEVEL
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def _row(path: str, prefix: str) -> str:
    """The block and, when there is one, the ModuleList entry inside it: ``down_blocks.0.attentions.1``."""
    parts = _split(path, prefix)
    block = _block(path, prefix)
    if block == TOP_LEVEL:
        return block
    rest = parts[block.count(".") + 1:]
    if len(rest) > 1 and rest[1].isdigit():
        return f"{block}.{rest[0]}.{rest[1]}"
    return block


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _shape_text(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    return "x".join(str(int(s)) for s in shape) if shape is not None else ""


# ---------------------------------------------------------------------------------------- memory timeline


def byte_unit(nbytes: float) -> tuple[str, int]:
    """The largest of GiB, MiB, KiB, B in which ``nbytes`` is at least 1: (name, bytes per unit)."""
    for name, size in _BYTE_UNITS:
        if nbytes >= size:
            return name, size
    return _BYTE_UNITS[-1]


def aligned_positions(baseline_nodes: Sequence[str], nodes: Sequence[str]) -> np.ndarray:
    """Positions (0..1) of ``nodes`` on the baseline's axis: where each node of another graph of the same
    model runs, as a fraction of the way through the baseline graph.

    Nodes present in both graphs (same name: everything the planner left unsliced) sit where they sit in the
    baseline; the rest (sliced submodule calls, split GroupNorms) are placed evenly between those anchors.
    Anchors out of order are ignored, so the result never runs backwards.
    """
    n = len(nodes)
    if n == 0:
        return np.zeros(0)
    base_index = {name: i for i, name in enumerate(baseline_nodes)}
    scale = max(len(baseline_nodes) - 1, 1)
    anchor_i, anchor_x = [], []
    last = -1
    for i, name in enumerate(nodes):
        b = base_index.get(name)
        if b is not None and b > last:
            anchor_i.append(i)
            anchor_x.append(b / scale)
            last = b
    if len(anchor_i) < 2:
        return np.linspace(0.0, 1.0, n)
    # pin both ends so the two curves start and finish together
    if anchor_i[0] != 0:
        anchor_i.insert(0, 0)
        anchor_x.insert(0, 0.0)
    if anchor_i[-1] != n - 1:
        anchor_i.append(n - 1)
        anchor_x.append(1.0)
    return np.interp(np.arange(n), anchor_i, anchor_x)


def memory_curve(
    timeline: MemoryTimeline, baseline: MemoryTimeline | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: where each node runs (0..1 through ``baseline``'s graph, by :func:`aligned_positions`;
    through the timeline's own graph without one) and the weights + live activation bytes there.

    A graph's inputs and weights come first and allocate nothing, so the curve starts at the node before the
    first change of live bytes.
    """
    first = _first_change(timeline.live_bytes)
    nodes = timeline.nodes[first:]
    y = timeline.weight_bytes + np.asarray(timeline.live_bytes[first:], dtype=float)
    if baseline is None or baseline is timeline:
        return (np.linspace(0.0, 1.0, len(nodes)) if len(nodes) > 1 else np.zeros(len(nodes))), y
    return aligned_positions(baseline.nodes[_first_change(baseline.live_bytes):], nodes), y


def memory_timeline_figure(
    baseline: MemoryTimeline,
    planned: MemoryTimeline | None = None,
    *,
    budget_bytes: int | None = None,
    graph_module: torch.fx.GraphModule | None = None,
    title: str | None = None,
) -> Figure:
    """Memory over one forward, baseline (eager) against the plan, and each block's activation peak.

    Top: weights + live activations at every node, the baseline's and the plan's on one axis (the plan's graph
    has other nodes; :func:`memory_curve` places it on the baseline's axis), each peak marked, the
    budget as a horizontal line, the weights as a band at the bottom. With ``graph_module`` (the captured or
    the compiled graph: anything whose node names the timelines list) the top-level blocks are shaded and
    named.
    Bottom: the activation peak of each block, baseline beside planned, with the room the budget leaves for
    activations (budget - weights) as a line.
    """
    timelines = [("baseline", baseline, BASELINE_COLOR)]
    if planned is not None:
        timelines.append(("planned", planned, PLANNED_COLOR))
    totals = [t.weight_bytes + max(t.live_bytes, default=0) for _, t, _ in timelines]
    unit, scale = byte_unit(max(totals + [budget_bytes or 0]))
    fig = Figure(figsize=(12.0, 7.6), layout="constrained")
    ax, bars = fig.subplots(2, 1, height_ratios=[3, 2])

    curves = {which: memory_curve(t, baseline) for which, t, _ in timelines}
    # the nodes each curve draws: memory_curve leaves out the graph's leading inputs and weights
    drawn = {which: t.nodes[len(t.nodes) - len(curves[which][0]):] for which, t, _ in timelines}
    if graph_module is not None:
        _shade_blocks(ax, graph_module, drawn, {which: x for which, (x, _) in curves.items()})
    weights = baseline.weight_bytes / scale
    ax.axhspan(0, weights, color="#E4E4E4", zorder=0.2)
    top = max(totals + [budget_bytes or 0]) / scale
    thin = weights < 0.05 * top  # too thin to hold its label: write it above the band
    ax.text(0.995, weights if thin else weights / 2, f"weights {format_bytes(baseline.weight_bytes)}",
            va="bottom" if thin else "center", ha="right", fontsize=8, color="#555555",
            transform=ax.get_yaxis_transform())
    for which, timeline, color in timelines:
        x, y = curves[which][0], curves[which][1] / scale
        total = format_bytes(timeline.weight_bytes + timeline.activation_peak_bytes)
        ax.plot(x, y, color=color, linewidth=0.9 if which == "baseline" else 1.2, gid=which,
                label=f"{which}: peak {total}")
        names = drawn[which]
        i = names.index(timeline.peak_node) if timeline.peak_node in names else int(np.argmax(y))
        ax.plot([x[i]], [y[i]], marker="v" if which == "baseline" else "o", markersize=7, color=color,
                markeredgecolor="white", linestyle="", gid=f"peak:{which}", zorder=3)
        where = timeline.peak_module_path or TOP_LEVEL
        right = x[i] > 0.6
        ax.annotate(f"{which} peak {total}\n{timeline.peak_node} in {_shorten(where, 56)}",
                    (x[i], y[i]), xytext=(-10 if right else 10, 6 if which == "baseline" else -34),
                    textcoords="offset points", fontsize=7.5, color=color, ha="right" if right else "left",
                    bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor=color, linewidth=0.6,
                              alpha=0.9), zorder=4)
    if budget_bytes is not None:
        ax.axhline(budget_bytes / scale, color=BUDGET_COLOR, linestyle="--", linewidth=1.2, gid="budget",
                   label=f"budget {format_bytes(budget_bytes)}")
    ax.set_ylim(0, top * 1.2)
    ax.set_xlim(0, 1)
    ax.set_ylabel(f"weights + activations ({unit})", fontsize=9)
    ax.set_xlabel("position in the graph (fraction of the baseline's operators)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.95)
    if title:
        ax.set_title(title, loc="left", fontsize=10)

    _block_bars(bars, baseline, planned, budget_bytes, scale, unit)
    return fig


def _first_change(live_bytes: Sequence[int]) -> int:
    """Index of the last node before live bytes first change (0 if they never do)."""
    for i, b in enumerate(live_bytes):
        if b != live_bytes[0]:
            return max(i - 1, 0)
    return 0


def _shade_blocks(ax: Axes, gm: torch.fx.GraphModule, nodes: dict[str, list[str]], xs: dict) -> None:
    """Shade every other top-level block, and name the blocks on a second x axis above the plot."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    paths = {n.name: module_path(n) for n in calls}
    prefix = _wrapper_prefix(list(paths.values()))
    block_of = {name: _block(p, prefix) for name, p in paths.items()}
    spans: dict[str, list[float]] = {}
    for which, names in nodes.items():
        for name, x in zip(names, xs[which]):
            block = block_of.get(name)
            if block is not None and block != TOP_LEVEL:
                lo_hi = spans.setdefault(block, [x, x])
                lo_hi[0], lo_hi[1] = min(lo_hi[0], x), max(lo_hi[1], x)
    ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
    for i, (block, (lo, hi)) in enumerate(ordered):
        if i % 2 == 0:
            ax.axvspan(lo, hi, color="#EDF1F7", zorder=0.1, gid=f"block:{block}")
    named = [(block, (lo + hi) / 2) for block, (lo, hi) in ordered if hi - lo >= MIN_NAMED_BLOCK_SPAN]
    top = ax.secondary_xaxis("top")
    top.set_xticks([x for _, x in named], [b for b, _ in named], rotation=35, ha="left", fontsize=7,
                   family="monospace")
    top.tick_params(length=2, pad=1)


def _block_bars(ax: Axes, baseline: MemoryTimeline, planned: MemoryTimeline | None, budget_bytes: int | None,
                scale: int, unit: str) -> None:
    names = [b.block for b in baseline.blocks]
    planned_by = {b.block: b.peak_bytes for b in planned.blocks} if planned is not None else {}
    for b in planned.blocks if planned is not None else []:
        if b.block not in names:
            names.append(b.block)
    base_by = {b.block: b.peak_bytes for b in baseline.blocks}
    x = np.arange(len(names))
    width = 0.4 if planned is not None else 0.7
    base = [base_by.get(n, 0) / scale for n in names]
    ax.bar(x - (width / 2 if planned is not None else 0), base, width, color=BASELINE_COLOR, alpha=0.75,
           label="baseline", gid="blocks:baseline")
    if planned is not None:
        plan = [planned_by.get(n, 0) / scale for n in names]
        ax.bar(x + width / 2, plan, width, color=PLANNED_COLOR, label="planned", gid="blocks:planned")
        largest = max(base_by.values(), default=0)
        for i, n in enumerate(names):
            b, p = base_by.get(n, 0), planned_by.get(n)
            if p is not None and b >= RATIO_MIN_FRACTION * largest and p < 0.95 * b:
                ax.text(x[i] + width / 2, plan[i], f"{p / b:.2f}x", ha="center",
                        va="bottom", fontsize=6.5, color=PLANNED_COLOR)
    if budget_bytes is not None:
        room = (budget_bytes - baseline.weight_bytes) / scale
        ax.axhline(room, color=BUDGET_COLOR, linestyle="--", linewidth=1.0, gid="activation-room",
                   label=f"budget - weights {format_bytes(budget_bytes - baseline.weight_bytes)}")
    peak_block = next((b.block for b in baseline.blocks if b.node == baseline.peak_node), None)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=7, family="monospace")
    for label, name in zip(ax.get_xticklabels(), names):
        if name == peak_block:
            label.set_fontweight("bold")
    ax.set_ylabel(f"activation peak ({unit})", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title("activation peak per block (bold: the block of the baseline peak)", loc="left", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


# ----------------------------------------------------------------------------------------- step similarity


def step_similarity_figure(
    similarity: np.ndarray | Sequence[Sequence[float]],
    key_steps: Iterable[int],
    *,
    title: str | None = None,
) -> Figure:
    """The similarity of features between denoising steps, with the chosen key steps.

    Args:
        similarity: a square matrix, ``similarity[i, j]`` the similarity (e.g. cosine) of the cached feature
            at steps ``i`` and ``j``; anything array-like (a CPU torch tensor, a numpy array, nested lists).
        key_steps: the steps that run the full network; each other step reuses the last key step before it.
            Step 0 must be a key step (nothing is cached before it).

    The key steps are marked on both axes and the diagonal; each outlined square spans a key step and the
    steps that reuse it, so what the reuse relies on is the similarity inside the squares.
    """
    sim = np.asarray(similarity, dtype=float)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square matrix, got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("similarity has NaN or infinite entries")
    steps = sim.shape[0]
    keys = list(key_steps)
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in keys):
        raise ValueError(f"key_steps must be integers, got {keys!r}")
    keys = sorted({int(k) for k in keys})
    if not keys or keys[0] != 0:
        raise ValueError(f"key_steps must include step 0 (nothing is cached before it), got {keys}")
    if keys[-1] >= steps:
        raise ValueError(f"key step {keys[-1]} is out of range for {steps} steps")

    fig = Figure(figsize=(6.4, 5.4), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(sim, cmap="viridis", origin="upper", interpolation="nearest",
                      vmin=float(sim.min()), vmax=float(sim.max()))
    image.set_gid("similarity")
    fig.colorbar(image, ax=ax, shrink=0.85, label="similarity")
    for start, end in zip(keys, keys[1:] + [steps]):
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), end - start, end - start, fill=False,
                               edgecolor="white", linewidth=1.4, gid="reuse-span"))
    ax.plot(keys, keys, linestyle="", marker="o", markersize=6, markerfacecolor="#C8102E",
            markeredgecolor="white", gid="key-steps", label="key step (full network)")
    ticks = list(range(steps)) if steps <= 30 else list(range(0, steps, max(1, steps // 15)))
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=7)
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for label in labels:
            if int(label.get_text()) in keys:
                label.set_color("#C8102E")
                label.set_fontweight("bold")
    ax.set_xlabel("denoising step", fontsize=9)
    ax.set_ylabel("denoising step", fontsize=9)
    ax.set_title(title or f"step similarity: {len(keys)} key steps of {steps} (squares: a key step and the "
                 "steps that reuse it)", loc="left", fontsize=9)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9)
    return fig


__all__ = [
    "GraphUnit", "KIND_COLORS", "aligned_positions", "byte_unit", "graph_figure", "group_graph",
    "memory_curve", "memory_timeline_figure", "step_similarity_figure",
]


def pipeline_figure(plan: Any) -> Figure:
    """A whole pipeline's phases (:class:`fxstream.pipeline_plan.PipelinePlan`): each phase's peak eager beside
    fxstream's, the resident weights and held frames as the bars' lower part, the tensors' budget as a line."""
    phases = plan.phases
    peaks = [p.eager_peak_bytes for p in phases] + [p.least_bytes for p in phases]
    unit, scale = byte_unit(max(peaks + [plan.tensor_budget_bytes or 0]))
    fig = Figure(figsize=(10.0, 4.8), layout="constrained")
    ax = fig.subplots()
    x = range(len(phases))
    width = 0.38
    for offset, label, color, values in (
        (-width / 2, "eager", BASELINE_COLOR, [p.eager_peak_bytes for p in phases]),
        (width / 2, "fxstream", PLANNED_COLOR,
         [p.peak_bytes if p.peak_bytes is not None else p.least_bytes for p in phases]),
    ):
        xs = [i + offset for i in x]
        resident = [p.resident_bytes / scale for p in phases]
        ax.bar(xs, [v / scale for v in values], width, color=color, label=f"{label} peak")
        ax.bar(xs, resident, width, color="0.75", label="weights resident + held" if offset > 0 else None)
    if plan.tensor_budget_bytes is not None:
        ax.axhline(plan.tensor_budget_bytes / scale, color="black", linestyle="--",
                   label=f"budget for tensors ({plan.tensor_budget_bytes / scale:.2f} {unit})")
    ax.set_xticks(list(x), [f"{p.name}\n{p.calls}" for p in phases], fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(f"{plan.pipeline}: {plan.frames} frames {plan.height}x{plan.width}, {plan.dtype}"
                 + (", model CPU offload" if plan.offload else "") + f", target {plan.target}"
                 + ("" if plan.fits is None else f": fits in {format_bytes(plan.budget_bytes)}: "
                    + ("yes" if plan.fits else "no")), fontsize=9)
    ax.legend(fontsize=8)
    return fig
