"""fxstream.viz: the grouped graph, the memory timeline and the step-similarity heatmap draw what they claim.

Figures are checked through their artists (each carries a gid naming what it is), on the tiny SVD UNet planned
for a budget it needs slicing to meet, and on a hand-made similarity matrix. Also ``fxstream plan --plot``.
"""

from __future__ import annotations

import io
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import fxstream.module  # noqa: E402
from fxstream import cli, models, viz  # noqa: E402
from fxstream.capture import capture, normalize_inputs  # noqa: E402
from passes import pipeline  # noqa: E402
from passes.chains import group_operators  # noqa: E402
from passes.meta import module_path  # noqa: E402
from passes.memory import MemoryTimeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny SVD UNet: 11.5 MiB baseline (weights included), so 9 MiB needs slicing.
BUDGET_BYTES = 9 * 2**20
TEMPORAL_RESBLOCK = "down_blocks.0.resnets.0.temporal_res_block"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(one_thread):
    """(entry, gm, groups): the tiny SVD UNet planned for BUDGET_BYTES, and the captured graph and groups the
    planner worked on (recorded as the planner groups them, which saves capturing the model a second time)."""
    built = models.build("svd", "tiny")
    args, kwargs = normalize_inputs(built.module, built.args, built.kwargs)
    seen = []

    def recording_group_operators(gm):
        grouping = group_operators(gm)
        seen.append(grouping[:2])
        return grouping

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "group_operators", recording_group_operators)
        entry = fxstream.plan(built.module, *args, budget_gb=BUDGET_BYTES / 2**30, **kwargs).details
    if len(seen) != 1:  # the planner changed how it groups: capture again rather than guess
        seen = [group_operators(capture(built.module, *args, **kwargs))[:2]]
    gm, groups = seen[0]
    return entry, gm, groups


def _collections(fig, prefix: str) -> list:
    return [c for c in fig.axes[0].collections if (c.get_gid() or "").startswith(prefix)]


def _count(collections) -> int:
    return sum(len(c.get_offsets()) for c in collections)


def _line(ax, gid: str):
    lines = [line for line in ax.get_lines() if line.get_gid() == gid]
    assert len(lines) == 1, f"expected one line {gid!r}, found {len(lines)}"
    return lines[0]


# ------------------------------------------------------------------------------------------------ graph


def test_group_graph_covers_every_operator_once(tiny):
    entry, gm, groups = tiny
    graph = viz.group_graph(gm, groups, entry.plan)
    units = [graph.nodes[v]["unit"] for v in graph]
    ops = Counter(op for u in units for op in u.ops)
    calls = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    assert sorted(ops) == sorted(calls) and set(ops.values()) == {1}
    by_name = {u.name: u for u in units}
    slices = {g.name: g.slices for g in entry.plan.groups}
    for g in groups:
        assert by_name[g.name].kind == g.kind
        assert by_name[g.name].slices == slices.get(g.name, 1)
        assert sorted(by_name[g.name].ops) == sorted(g.node_names)
    assert all(u.kind == "unsliced" for u in units if u.name not in slices and u.group is None)
    assert all(d["bytes"] >= 0 for *_, d in graph.edges(data=True))


def test_graph_figure_one_node_per_group(tiny):
    entry, gm, groups = tiny
    assert len(groups) <= viz.AUTO_MAX_GROUPS  # "auto" draws the tiny model group by group
    fig = viz.graph_figure(gm, groups, entry.plan)
    assert _count(_collections(fig, "group:")) == len(groups)
    graph = viz.group_graph(gm, groups, entry.plan)
    runs = sum(graph.nodes[v]["unit"].kind == "unsliced" for v in graph)
    assert _count(_collections(fig, "unsliced")) == runs > 0
    # each kind in its own colour; sliced groups solid, whole ones pale
    kinds = Counter(g.kind for g in groups)
    sliced = {g.name: g.slices for g in entry.plan.groups}
    assert sliced, "the budget should make the planner slice"
    for kind in kinds:
        drawn = _collections(fig, f"group:{kind}:")
        assert _count(drawn) == kinds[kind]
        solid = [c for c in drawn if c.get_gid().endswith(":sliced")]
        assert _count(solid) == sum(1 for g in groups if g.kind == kind and g.name in sliced)
        for c in solid:
            assert np.allclose(c.get_facecolor()[0][:3], _rgb(viz.KIND_COLORS[kind]))
    # the slice counts are the labels
    labels = sorted(t.get_text() for t in fig.axes[0].texts if t.get_gid() == "slices")
    assert labels == sorted(str(k) for k in sliced.values())
    assert "sliced by the plan" in fig.axes[0].get_title(loc="left")


def _rgb(color: str) -> tuple:
    import matplotlib.colors as mcolors

    return mcolors.to_rgb(color)


def test_graph_figure_collapses_to_blocks(tiny, monkeypatch):
    entry, gm, groups = tiny
    monkeypatch.setattr(viz, "AUTO_MAX_GROUPS", 10)  # as a full-size UNet with hundreds of groups
    fig = viz.graph_figure(gm, groups, entry.plan)
    blocks = _collections(fig, "block")
    names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert _count(blocks) == len(names) == len(viz.group_graph(gm, groups, level="blocks"))
    assert names == [b.block for b in entry.baseline.blocks]  # the memory model's blocks, in order
    # the bars hold every operator once
    bars = [p for p in fig.axes[0].patches if (p.get_gid() or "").startswith("bar:")]
    ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    assert round(sum(p.get_width() for p in bars)) == ops


def test_graph_figure_zooms_into_a_temporal_resblock(tiny):
    entry, gm, groups = tiny
    fig = viz.graph_figure(gm, groups, entry.plan, level="ops", within=TEMPORAL_RESBLOCK)
    inside = [n for n in gm.graph.nodes if n.op == "call_function"
              and module_path(n).startswith(TEMPORAL_RESBLOCK)]
    drawn = _collections(fig, "group:") + _collections(fig, "unsliced")
    assert _count(drawn) == len(inside)
    split = [n for n in inside if n.target.__name__.startswith(("group_norm_partial", "group_norm_apply"))]
    assert len(split) == 4  # norm1 and norm2, each as statistics + apply
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels.count("group_norm_partial") == labels.count("group_norm_apply") == 2
    assert TEMPORAL_RESBLOCK in fig.axes[0].get_title(loc="left")


def test_graph_arguments_are_checked(tiny):
    _, gm, groups = tiny
    with pytest.raises(ValueError, match="level"):
        viz.group_graph(gm, groups, level="layers")
    with pytest.raises(ValueError, match="no operator"):
        viz.graph_figure(gm, groups, within="down_blocks.9")


# ------------------------------------------------------------------------------------------ memory timeline


def test_memory_timeline_figure(tiny):
    entry, _, _ = tiny
    fig = viz.memory_timeline_figure(entry.baseline, entry.planned, budget_bytes=BUDGET_BYTES,
                                     graph_module=entry.graph_module, title="svd tiny")
    ax, bars = fig.axes[:2]
    unit, scale = viz.byte_unit(entry.plan.baseline_peak_bytes)
    assert unit == "MiB" and unit in ax.get_ylabel()
    budget = _line(ax, "budget")
    assert np.allclose(budget.get_ydata(), BUDGET_BYTES / scale)
    for which, timeline, peak in (("baseline", entry.baseline, entry.plan.baseline_peak_bytes),
                                  ("planned", entry.planned, entry.plan.predicted_peak_bytes)):
        curve = _line(ax, which)
        assert np.isclose(curve.get_ydata().max(), peak / scale)
        assert 0 <= curve.get_xdata().min() and curve.get_xdata().max() <= 1
        assert np.all(np.diff(curve.get_xdata()) >= 0)
        marker = _line(ax, f"peak:{which}")
        assert np.isclose(marker.get_ydata()[0], peak / scale)
    assert entry.plan.predicted_peak_bytes <= BUDGET_BYTES < entry.plan.baseline_peak_bytes
    # per-block breakdown: one bar per block on each side
    per_block = {c.get_label(): c for c in bars.containers}
    assert len(per_block["baseline"]) == len(per_block["planned"]) == len(entry.baseline.blocks)
    heights = [b.get_height() * scale for b in per_block["baseline"]]
    assert np.allclose(heights, [b.peak_bytes for b in entry.baseline.blocks])
    # blocks named on the top axis
    named = [t.get_text() for t in ax.child_axes[0].get_xticklabels()]
    assert "down_blocks.0" in named and "up_blocks.1" in named


def test_memory_timeline_baseline_only(tiny):
    entry, _, _ = tiny
    fig = viz.memory_timeline_figure(entry.baseline)
    ax = fig.axes[0]
    assert [line.get_gid() for line in ax.get_lines()] == ["baseline", "peak:baseline"]
    assert [c.get_label() for c in fig.axes[1].containers] == ["baseline"]


def test_memory_timeline_round_trips_json(tiny):
    # what `fxstream plan --json` writes is enough to draw the figure again
    entry, _, _ = tiny
    baseline = MemoryTimeline.from_dict(entry.baseline.to_dict())
    planned = MemoryTimeline.from_dict(entry.planned.to_dict())
    fig = viz.memory_timeline_figure(baseline, planned, budget_bytes=BUDGET_BYTES)
    assert _line(fig.axes[0], "planned").get_ydata().size == len(planned.nodes) - viz._first_change(
        planned.live_bytes)


def test_aligned_positions():
    baseline = ["a", "b", "c", "d", "e"]
    nodes = ["a", "sliced_1", "sliced_2", "d", "e"]
    x = viz.aligned_positions(baseline, nodes)
    assert x.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # out-of-order anchors are ignored: never runs backwards
    x = viz.aligned_positions(baseline, ["a", "d", "b", "e"])
    assert np.all(np.diff(x) >= 0) and x[0] == 0 and x[-1] == 1
    # nothing shared: evenly spaced
    assert viz.aligned_positions(baseline, ["x", "y", "z"]).tolist() == [0.0, 0.5, 1.0]
    assert viz.aligned_positions(baseline, []).size == 0


def test_byte_unit():
    assert viz.byte_unit(3 * 2**30) == ("GiB", 2**30)
    assert viz.byte_unit(2**30 - 1) == ("MiB", 2**20)
    assert viz.byte_unit(5 * 2**10) == ("KiB", 2**10)
    assert viz.byte_unit(0) == ("B", 1)


# --------------------------------------------------------------------------------------- step similarity


def _similarity(steps: int = 12) -> np.ndarray:
    i = np.arange(steps)
    return np.exp(-np.abs(i[:, None] - i[None, :]) / 4.0)


def test_step_similarity_figure():
    sim = _similarity()
    keys = [0, 3, 7, 11]
    fig = viz.step_similarity_figure(sim, keys)
    ax = fig.axes[0]
    image = next(im for im in ax.get_images() if im.get_gid() == "similarity")
    assert np.array_equal(image.get_array(), sim)
    marks = _line(ax, "key-steps")
    assert marks.get_xdata().tolist() == keys == marks.get_ydata().tolist()
    spans = [p for p in ax.patches if p.get_gid() == "reuse-span"]
    # each key step with the steps that reuse it: [0, 3), [3, 7), [7, 11), [11, 12)
    assert [(p.get_x() + 0.5, p.get_width()) for p in spans] == [(0, 3), (3, 4), (7, 4), (11, 1)]
    red = [t.get_text() for t in ax.get_xticklabels() if t.get_fontweight() == "bold"]
    assert red == [str(k) for k in keys]
    assert len(fig.axes) == 2  # the colour bar


def test_step_similarity_accepts_lists_and_unsorted_keys():
    fig = viz.step_similarity_figure(_similarity(5).tolist(), [4, 0, 2, 2])
    assert _line(fig.axes[0], "key-steps").get_xdata().tolist() == [0, 2, 4]


@pytest.mark.parametrize("sim, keys, match", [
    (np.ones((3, 4)), [0], "square"),
    (np.ones(3), [0], "square"),
    (np.full((3, 3), np.nan), [0], "NaN"),
    (np.ones((3, 3)), [1, 2], "step 0"),
    (np.ones((3, 3)), [], "step 0"),
    (np.ones((3, 3)), [0, 3], "out of range"),
    (np.ones((3, 3)), [0, 1.5], "integers"),
])
def test_step_similarity_rejects_bad_input(sim, keys, match):
    with pytest.raises(ValueError, match=match):
        viz.step_similarity_figure(sim, keys)


# ------------------------------------------------------------------------------------------- the command


def test_plan_plot_writes_png(tmp_path):
    path = tmp_path / "timeline.png"
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["plan", "--model", "sd-vae-decoder", "--size", "tiny", "--budget-gb", "0.005",
                         "--plot", str(path)])
    assert code == 0, err.getvalue()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {path}" in out.getvalue()


@pytest.mark.parametrize("name, match", [("timeline.gif", "must end in"), ("missing/t.png", "cannot write")])
def test_plan_plot_bad_path_fails_before_work(tmp_path, capsys, name, match):
    code = cli.main(["plan", "--model", "svd-xt", "--plot", str(tmp_path / name)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fxstream: error: argument --plot:") and match in err
    assert "building" not in err
