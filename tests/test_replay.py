"""A Plan is a recipe: ``compile(plan=...)`` replays it without planning, in this process or another; a plan
that does not fit raises PlanMismatchError; the on-disk plan cache makes a second process skip planning."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxstream
from fxstream import models
from fxstream.errors import PlanMismatchError
from passes import pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def _sample(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.sample


def _no_planning(*args, **kwargs):
    raise AssertionError("planned, where the saved plan should have been replayed")


@pytest.fixture(scope="module")
def decoder_plan(tmp_path_factory):
    """The tiny SVD decoder at its minimum (row-streamed tail), compiled once: its plan, output and input."""
    m = models.build("svd-vae-decoder", "tiny")
    compiled = fxstream.compile(m.module)
    with torch.no_grad():
        out = _sample(compiled(*m.args, **m.kwargs))
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    compiled.plan.to_json(path)
    assert any(g.kind == "rows" for g in compiled.plan.groups)
    return m, compiled, out, path


def test_a_saved_plan_replays_in_a_new_process_exactly_without_planning(decoder_plan, tmp_path):
    m, compiled, out, path = decoder_plan
    torch.save({"out": out, "z": m.args[0], "kwargs": m.kwargs}, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import fxstream
        from fxstream import models
        from passes import pipeline
        def no_planning(*a, **k):
            raise AssertionError("planned")
        pipeline.plan = no_planning
        torch.set_num_threads(1)
        m = models.build("svd-vae-decoder", "tiny")
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        c = fxstream.compile(m.module, plan={str(path)!r})
        with torch.no_grad():
            out = c(ref["z"], **ref["kwargs"])
        out = out if isinstance(out, torch.Tensor) else out.sample
        print(torch.equal(out, ref["out"]), c.compiled.compile_seconds)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    equal, seconds = result.stdout.split()
    assert equal == "True"
    print(f"\nplanned in {compiled.compiled.compile_seconds:.1f} s; replayed in a new process in {float(seconds):.1f} s")


def test_replayed_groups_and_slices_are_the_planned_ones(monkeypatch):
    m = models.build("svd", "tiny")
    first = fxstream.compile(m.module, chunks=3)
    with torch.no_grad():
        ref = first(*m.args, **m.kwargs).sample
    saved = fxstream.Plan.from_json(first.plan.to_json())
    monkeypatch.setattr(pipeline, "plan", _no_planning)
    import fxstream.module as module_mod
    monkeypatch.setattr(module_mod, "plan_graph", _no_planning)
    again = fxstream.compile(m.module, plan=saved)
    with torch.no_grad():
        out = again(*m.args, **m.kwargs).sample
    assert torch.equal(out, ref)
    assert again.plan.to_dict() == first.plan.to_dict()
    assert again.compiled.planned.activation_peak_bytes == first.compiled.planned.activation_peak_bytes


def test_a_plan_for_other_inputs_raises_plan_mismatch(decoder_plan):
    m, _, _, path = decoder_plan
    other = models.build("svd-vae-decoder", "tiny", frames=2)
    compiled = fxstream.compile(other.module, plan=path)
    with pytest.raises(PlanMismatchError, match="made for inputs"):
        compiled(*other.args, **other.kwargs)


def test_a_plan_for_another_graph_or_format_raises_plan_mismatch(decoder_plan):
    m, compiled, _, _ = decoder_plan
    data = compiled.plan.to_dict()
    for change, words in (({"fingerprint": "0" * 32}, "another graph"), ({"version": 1}, "format version")):
        saved = fxstream.Plan.from_dict({**data, **change})
        with pytest.raises(PlanMismatchError, match=words):
            fxstream.compile(m.module, plan=saved)(*m.args, **m.kwargs)


def test_compile_with_a_plan_takes_no_budget_and_names_a_bad_path(tmp_path):
    m = models.build("svd-vae-decoder", "tiny")
    with pytest.raises(ValueError, match="plan"):
        fxstream.compile(m.module, budget_gb=1, plan=fxstream.Plan.from_dict(_minimal()))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a saved plan"):
        fxstream.compile(m.module, plan=tmp_path / "bad.json")


def _minimal() -> dict:
    return dict(groups=[], predicted_peak_bytes=0, predicted_activation_peak_bytes=0, baseline_peak_bytes=0,
                baseline_activation_peak_bytes=0, weight_bytes=0, budget_bytes=None, peak_node="",
                peak_module_path="", target="cpu")


class _Tokens(torch.nn.Module):
    """A small per-token chain with a GroupNorm over the tokens: quick to plan, with groups and a split."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 32)
        self.norm = torch.nn.GroupNorm(4, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):  # (N, L, 8)
        h = torch.nn.functional.gelu(self.a(x))
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.b(h)


class _Small:
    module = _Tokens().eval().requires_grad_(False)
    args = (torch.randn(2, 24, 8),)
    kwargs: dict = {}


def test_the_plan_cache_makes_a_second_compile_and_plan_skip_planning(monkeypatch, tmp_path):
    monkeypatch.setenv("FXSTREAM_PLAN_CACHE", "1")
    monkeypatch.setenv("FXSTREAM_CACHE_DIR", str(tmp_path))
    m = _Small
    first = fxstream.compile(m.module, chunks=2)
    with torch.no_grad():
        ref = _sample(first(*m.args, **m.kwargs))
    assert first.plan.sliced_groups
    assert len(list(tmp_path.glob("*.json"))) == 1
    import fxstream.module as module_mod
    monkeypatch.setattr(module_mod, "plan_graph", _no_planning)
    second = fxstream.compile(m.module, chunks=2)  # a new module, as in a second process
    with torch.no_grad():
        assert torch.equal(_sample(second(*m.args, **m.kwargs)), ref)

    def no_capture(*args, **kwargs):
        raise AssertionError("captured")

    monkeypatch.setattr(module_mod, "capture", no_capture)
    answer = fxstream.plan(m.module, *m.args, chunks=2, **m.kwargs)  # from the cache, without capturing
    assert answer.to_dict() == first.plan.to_dict()
    assert answer.details.baseline.activation_peak_bytes == first.compiled.baseline.activation_peak_bytes


def test_a_stale_cache_entry_is_planned_again(monkeypatch, tmp_path):
    monkeypatch.setenv("FXSTREAM_PLAN_CACHE", "1")
    monkeypatch.setenv("FXSTREAM_CACHE_DIR", str(tmp_path))
    m = _Small
    fxstream.compile(m.module, chunks=2)(*m.args, **m.kwargs)
    (entry,) = tmp_path.glob("*.json")
    data = json.loads(entry.read_text())
    data["plan"]["fingerprint"] = "0" * 32  # as if the module's code had changed under the same class and config
    entry.write_text(json.dumps(data))
    compiled = fxstream.compile(m.module, chunks=2)
    with torch.no_grad():
        out = _sample(compiled(*m.args, **m.kwargs))
        ref = _sample(m.module(*m.args, **m.kwargs))
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert json.loads(entry.read_text())["plan"]["fingerprint"] != "0" * 32  # re-planned and written again


def test_a_cache_entry_planned_by_other_planner_code_is_not_read(monkeypatch, tmp_path):
    # a changed op rule or pass leaves the graph's fingerprint as it was: the planner's code is part of the key
    from fxstream import plan_cache

    monkeypatch.setenv("FXSTREAM_PLAN_CACHE", "1")
    monkeypatch.setenv("FXSTREAM_CACHE_DIR", str(tmp_path))
    m = _Small
    fxstream.compile(m.module, chunks=2)(*m.args, **m.kwargs)
    assert len(list(tmp_path.glob("*.json"))) == 1
    monkeypatch.setattr(plan_cache, "_source_digest", lambda: "other planner code")
    fxstream.compile(m.module, chunks=2)(*m.args, **m.kwargs)
    assert len(list(tmp_path.glob("*.json"))) == 2  # planned again, under its own key


def test_the_plan_cache_is_off_with_its_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("FXSTREAM_PLAN_CACHE", "0")
    monkeypatch.setenv("FXSTREAM_CACHE_DIR", str(tmp_path))
    m = _Small
    fxstream.compile(m.module, chunks=2)(*m.args, **m.kwargs)
    assert not list(tmp_path.iterdir())


def test_a_step_rehash_plan_replays_its_schedule_and_both_graphs(monkeypatch, tmp_path):
    from fxstream import reference as ref

    model = ref.load("svd")
    first = fxstream.compile(model.unet, chunks=2, rehash="auto")
    video = model.sample(steps=4, seed=0, unet=first)
    assert first.plan.rehash is not None and first.plan.rehash.partial_groups
    first.plan.to_json(tmp_path / "plan.json")
    import fxstream.module as module_mod
    monkeypatch.setattr(module_mod, "plan_graph", _no_planning)
    again = fxstream.compile(model.unet, plan=tmp_path / "plan.json")
    assert torch.equal(model.sample(steps=4, seed=0, unet=again), video)
    assert again.rehash.history == first.rehash.history and not all(full for _, full in again.rehash.history)
