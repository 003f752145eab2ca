"""passes.timing and fxstream.timing: the time model (op classes, FLOPs, loops' counts, the plan's predicted
seconds) and the measurement of a device's op costs. Timed assertions do not belong here: the predictions are
checked against measured calls by benchmarks/cpu.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxstream
from fxstream.capture import capture
from fxstream.timing import dispatch_costs, fit_rates, measure_costs
from passes import timing
from passes.rows import RowAnalysis, segment_estimate, segment_loop
from passes.timing import DeviceCosts, LoopCost, costs_for, graph_seconds, node_costs, node_flops, op_class
from tests.test_rows import Tail

pytestmark = pytest.mark.usefixtures("one_thread")


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = F.silu(self.norm(self.conv(x)))
        t = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self.proj(t).unflatten(-1, (2, 4)).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q)
        return torch.cat([a, q], dim=1)


def _by_target(gm):
    out = {}
    for n in gm.graph.nodes:
        out.setdefault(str(n.target), []).append(n)
    return out


def test_op_classes_come_from_the_op_table():
    gm = capture(Mixed().eval(), torch.randn(2, 4, 8, 8))
    got = {t: {op_class(n) for n in ns} for t, ns in _by_target(gm).items()}
    assert got["aten.conv2d.default"] == {"conv"}
    assert got["aten.group_norm.default"] == {"norm"}
    assert got["aten.linear.default"] == {"matmul"}
    assert got["aten.scaled_dot_product_attention.default"] == {"attention"}
    assert got["aten.silu.default"] == {"pointwise"}
    assert got["aten.cat.default"] == {"copy"}
    assert got["aten.transpose.int"] == {"view"}
    assert all(op_class(n) is None for n in gm.graph.nodes if n.op in ("placeholder", "get_attr", "output"))


def test_flops_follow_torch_formulas_on_cpu_and_meta_alike():
    """SDPA's FLOPs are its two matrix products on every device (torch's counter misses the CPU kernel)."""
    flops = []
    for device in ("cpu", "meta"):
        gm = capture(Mixed().to(device).eval(), torch.randn(2, 4, 8, 8, device=device))
        by = _by_target(gm)
        sdpa = by["aten.scaled_dot_product_attention.default"][0]
        conv = by["aten.conv2d.default"][0]
        flops.append((node_flops(sdpa), node_flops(conv)))
    (sdpa_cpu, conv_cpu), (sdpa_meta, conv_meta) = flops
    b, heads, tokens, dim = 2, 2, 64, 4
    assert sdpa_cpu == sdpa_meta == 2 * b * heads * tokens * tokens * (dim + dim)
    assert conv_cpu == conv_meta == 2 * (2 * 8 * 8 * 8) * (4 * 3 * 3)


def test_memory_classes_count_the_bytes_read_and_written():
    gm = capture(Mixed().eval(), torch.randn(2, 4, 8, 8))
    table = node_costs(gm)
    silu = _by_target(gm)["aten.silu.default"][0]
    assert table[silu].nbytes == 2 * silu.meta["val"].numel() * 4
    assert table[silu].flops == 0


def test_cost_tables_round_trip_and_the_shipped_ones_load():
    for target in ("cpu", "cuda", "cuda:1"):
        costs = costs_for(target)
        assert costs.kind == ("cpu" if target == "cpu" else "cuda")
        assert set(costs.flops_per_s) == set(timing.COMPUTE) and set(costs.bytes_per_s) == set(timing.MEMORY)
        assert costs.source
        assert DeviceCosts.from_json(costs.to_json()) == costs


def test_loop_seconds_add_work_dispatch_and_copies():
    costs = DeviceCosts("cpu", {"conv": 1e9, "matmul": 1e9, "attention": 1e9},
                        {"norm": 1e9, "copy": 2e9, "pointwise": 1e9}, op_s=1e-6, loop_s=2e-6, call_s=3e-6)
    loop = LoopCost(work=[timing.NodeCost("conv", 4e9, 0), timing.NodeCost("pointwise", 0, 1e9)],
                    ops=10, instructions=100, steps=5, copy_bytes=4e9)
    assert loop.seconds(costs) == pytest.approx(4 + 1 + 10e-6 + 200e-6 + 15e-6 + 2)
    parts = loop.breakdown(costs)
    assert parts["conv"] == pytest.approx(4) and parts["copy"] == pytest.approx(2)
    assert sum(parts.values()) == pytest.approx(loop.seconds(costs))


def test_a_streamed_segment_counts_each_pass_recomputation():
    """Pass j recomputes what its statistics need: a node before the first GroupNorm counts once per pass."""
    torch.manual_seed(0)
    gm = capture(Tail(c=8).eval(), torch.randn(6, 8, 16, 16))
    analysis = RowAnalysis(gm)
    seg = analysis.segment(analysis.cut_points()[0], analysis.graph_output)
    assert seg.num_passes > 2
    loop = segment_loop(seg, 4)
    conv1 = next(n for n in seg.nodes if str(n.target) == "aten.conv2d.default")
    table = node_costs(gm)
    assert sum(1 for w in loop.work if w is table[conv1]) == seg.num_passes - 1  # every pass after norm1's
    more = segment_loop(seg, 8)
    assert more.instructions > loop.instructions and more.copy_bytes > loop.copy_bytes
    assert segment_estimate(seg, 4)[1] == pytest.approx(loop.seconds(costs_for("cpu")))


def test_plans_predict_their_time_and_eager_time():
    torch.manual_seed(0)
    model, x = Tail(c=8).eval(), torch.randn(6, 8, 16, 16)
    whole = fxstream.plan(model, x, chunks=1, target="cpu")
    low = fxstream.plan(model, x, target="cpu")
    assert low.groups and any(g.kind == "rows" for g in low.groups)
    assert whole.baseline_seconds == pytest.approx(low.baseline_seconds)
    assert low.predicted_seconds > whole.predicted_seconds  # passes and bands cost time
    assert low.predicted_slowdown > 1
    assert low.baseline_seconds == pytest.approx(graph_seconds(capture(model, x), costs_for("cpu")))
    assert "cpu" in low.time_model
    again = fxstream.Plan.from_json(low.to_json())
    assert again.predicted_seconds == low.predicted_seconds and again.time_model == low.time_model
    report = fxstream.compile(model, target="cpu")
    with torch.no_grad():
        report(x)
    assert "time (predicted)" in report.report()


def test_the_planner_predicts_with_the_table_in_use():
    torch.manual_seed(0)
    model, x = Tail(c=8).eval(), torch.randn(6, 8, 16, 16)
    shipped = costs_for("cpu")
    base = fxstream.plan(model, x, target="cpu")
    try:
        timing.use_costs(dataclasses.replace(shipped, loop_s=shipped.loop_s * 100, source="slow loops"))
        slow = fxstream.plan(model, x, target="cpu")
    finally:
        timing.use_costs(shipped)
    assert slow.time_model.endswith("slow loops")
    assert slow.predicted_seconds > base.predicted_seconds
    assert slow.baseline_seconds == pytest.approx(base.baseline_seconds)  # eager runs no band program


def test_fit_rates_recovers_the_rates_it_was_made_with():
    gm = capture(Mixed().eval(), torch.randn(2, 4, 8, 8))
    table = node_costs(gm)
    op_s, conv_rate, bw = 5e-6, 2e10, 3e9
    times = {}
    for n, c in table.items():
        if c.kind == "conv":
            times[n] = op_s + c.flops / conv_rate
        elif c.kind == "pointwise":
            times[n] = op_s + c.nbytes / bw
    flops, membw, counts, by_op = fit_rates([(gm, times)], op_s)
    assert flops["conv"] == pytest.approx(conv_rate, rel=1e-6)
    assert membw["pointwise"] == pytest.approx(bw, rel=1e-6)
    assert counts["conv"]["nodes"] == 1


def test_measuring_costs_on_a_tiny_model():
    d = dispatch_costs("cpu", ops=50, repeats=3)
    assert all(v >= 0 for v in d.values()) and d["op_s"] > 0 and d["loop_s"] > 0
    costs = measure_costs("cpu", models=("sd-vae-decoder",), size="tiny", repeats=1)
    assert costs.kind == "cpu" and costs.measured
    assert all(v > 0 for v in (*costs.flops_per_s.values(), *costs.bytes_per_s.values()))
    assert costs.details["nodes"]["conv"]["nodes"] > 0
    assert DeviceCosts.from_json(costs.to_json()) == costs


def test_data_dependent_sizes_are_timed_at_their_largest(monkeypatch):
    """Mochi's attention runs on the prompt's unmasked tokens (``nonzero``): its FLOPs count at the largest size the
    shape environment allows, so the Plan's seconds are numbers a user can compare, print and save."""
    monkeypatch.setenv("FXSTREAM_PLAN_CACHE", "0")
    m = fxstream.models.build("mochi", "tiny")
    plan = fxstream.plan(m.module, *m.args, **m.kwargs)
    assert type(plan.predicted_seconds) is float and type(plan.baseline_seconds) is float
    assert plan.predicted_slowdown > 0
    assert fxstream.Plan.from_json(plan.to_json()).predicted_seconds == plan.predicted_seconds
