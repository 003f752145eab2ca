"""passes.pipeline (the one planner) and its public face, ``fxstream.plan``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxstream
from fxstream import models
from fxstream.capture import capture
from fxstream.errors import BudgetError, PlanningWarning
from passes import pipeline
from passes.pipeline import PlanRequest

pytestmark = pytest.mark.usefixtures("one_thread")


def _svd_decoder():
    return models.build("svd-vae-decoder", "tiny")


def test_plan_is_what_compile_decides_without_running_the_module():
    m = _svd_decoder()
    from torch._subclasses.fake_tensor import FakeTensor

    seen = []
    handle = m.module.register_forward_hook(lambda mod, inputs, out: seen.append(type(out)))
    plan = fxstream.plan(m.module, *m.args, chunks=2, **m.kwargs)
    handle.remove()
    assert seen and all(issubclass(t, FakeTensor) for t in seen)  # traced on fake tensors, never run
    compiled = fxstream.compile(m.module, chunks=2)
    compiled(*m.args, **m.kwargs)
    assert plan.to_dict() == compiled.plan.to_dict()
    assert plan.details.baseline.activation_peak_bytes == plan.baseline_activation_peak_bytes
    assert plan.details.planned.activation_peak_bytes <= plan.predicted_activation_peak_bytes


def test_plan_works_on_the_meta_device_and_never_saves_its_details():
    m = models.build("svd-vae-decoder", "tiny", device="meta")
    plan = fxstream.plan(m.module, *m.args, budget_gb=1, **m.kwargs)
    assert plan.target == "cuda" and plan.predicted_peak_bytes <= 2**30
    assert "details" not in plan.to_dict()
    assert fxstream.Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()


def test_plan_checks_its_arguments_as_compile_does():
    m = _svd_decoder()
    for bad in (dict(budget_gb=0), dict(budget_gb=float("inf")), dict(chunks=True), dict(target="tpu")):
        with pytest.raises(ValueError):
            fxstream.plan(m.module, *m.args, **bad, **m.kwargs)


def test_the_planner_never_changes_the_captured_graph():
    m = _svd_decoder()
    gm = capture(m.module, *m.args, **m.kwargs)
    before = [(n.name, n.target) for n in gm.graph.nodes]
    planned = pipeline.plan(gm, PlanRequest(chunks=2))
    assert planned.plan.split_reductions  # grouping split GroupNorms, on its own copy
    assert [(n.name, n.target) for n in gm.graph.nodes] == before


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def test_a_pass_that_fails_leaves_the_graph_whole_exactly(monkeypatch):
    """The net under every pass: an unexpected failure in planning is no crash; the graph runs unsliced."""
    def broken(*args, **kwargs):
        raise IndexError("a pattern no rule foresaw")

    monkeypatch.setattr(pipeline, "group_operators", broken)
    net = _Net().eval().requires_grad_(False)
    x = torch.randn(64, 8)
    compiled = fxstream.compile(net, chunks=3)
    with pytest.warns(PlanningWarning, match="planning stopped in passes/pipeline.py"):
        out = compiled(x)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    assert not compiled.plan.sliced_groups
    assert any("IndexError: a pattern no rule foresaw" in n and "runs whole" in n for n in compiled.plan.notes)
    with pytest.warns(PlanningWarning), pytest.raises(BudgetError, match="planning stopped"):
        fxstream.plan(net, x, budget_gb=1e-9)
