"""Step Rehash on the tiny trained reference models: off means identical, no state leaks between generations,
full steps stay exact under slicing, FLOPs saved at 13 of 25 full steps, calibration."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fxstream
from fxstream import reference as ref
from fxstream.runtime.rehash import RehashConfig, Schedule
from passes.plan import Plan

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 25
FULL = 13
RTOL = 1e-5
UNSLICED_GB = 1024  # every tiny model fits: compiled graphs run unsliced (and plan fast)


@pytest.fixture(scope="module", params=ref.NAMES)
def model(request):
    return ref.load(request.param)


@pytest.fixture(scope="module")
def calibration(model):
    """The paper's cut (rehash="auto": the decoder's last temporal layer) with 13 full steps; cheap: its partial
    graph is a few nodes, no sensitivity runs, no validation (tests/test_calibrate.py covers those)."""
    return fxstream.calibrate(model.unet, lambda u: model.sample(steps=STEPS, seed=0, unet=u), full_steps=FULL,
                              cache_points=["auto"], validate=0, sensitivity_points=0)


@pytest.fixture(scope="module")
def rehashed(model, calibration):
    """Compiled unsliced with the calibrated config; its first generation is seed 0."""
    compiled = fxstream.compile(model.unet, UNSLICED_GB, rehash=calibration.config)
    rec = Recorder(compiled, count_flops=True)
    video = model.sample(steps=STEPS, seed=0, unet=rec)
    return compiled, rec, video


@pytest.fixture(scope="module")
def all_full(model, calibration):
    """Like ``rehashed`` (same cache point, same graphs) but every step full; first generation seed 0."""
    config = RehashConfig(calibration.recommended.path, Schedule.interval(1))
    compiled = fxstream.compile(model.unet, UNSLICED_GB, rehash=config)
    rec = Recorder(compiled, count_flops=True)
    video = model.sample(steps=STEPS, seed=0, unet=rec)
    return compiled, rec, video


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= RTOL * b.abs().max().item()


class Recorder:
    """Calls a compiled UNet; on full steps also runs the eager UNet on the same inputs and keeps the largest
    relative difference; with ``count_flops``, counts the FLOPs of every call (only the runs
    ``test_flops_at_13_of_25_full_steps`` reads: counting slows every call down)."""

    def __init__(self, compiled, eager=None, count_flops=False):
        self.compiled, self.eager, self.count_flops = compiled, eager, count_flops
        self.worst = 0.0
        self.flops = 0

    def __call__(self, *args, **kwargs):
        if self.count_flops:
            with FlopCounterMode(display=False) as counter:
                out = self.compiled(*args, **kwargs)
            self.flops += counter.get_total_flops()
        else:
            out = self.compiled(*args, **kwargs)
        if self.eager is not None and self.compiled.rehash.history[-1][1]:
            expected = self.eager(*args, **kwargs)[0]
            diff = (out[0] - expected).abs().max().item() / expected.abs().max().item()
            self.worst = max(self.worst, diff)
        return out


def test_reference_models_load_and_denoise(model):
    video = model.sample(steps=10, seed=0)
    assert video.shape == (1, ref.FRAMES, ref.CHANNELS, ref.SIZE, ref.SIZE)
    assert torch.isfinite(video).all()
    assert model.metadata.get("command", "").startswith("python scripts/train_reference.py")


def test_rehash_off_is_the_compiled_model(model, all_full):
    plain = model.sample(steps=STEPS, seed=0, unet=fxstream.compile(model.unet, UNSLICED_GB))
    off = model.sample(steps=STEPS, seed=0, unet=fxstream.compile(model.unet, UNSLICED_GB, rehash="off"))
    assert torch.equal(off, plain)
    # rehash on with every step full: the full graph (which also stores the feature) gives the same video
    compiled, _, video = all_full
    assert _close(video, plain)
    assert compiled.rehash.full_steps_run == list(range(STEPS))


def test_generations_do_not_leak_state(model, calibration, rehashed):
    compiled, _, first = rehashed  # seed 0, the module's first generation: a run alone
    other = model.sample(steps=STEPS, seed=1, unet=compiled)
    assert not torch.equal(other, first)
    assert compiled.rehash.full_steps_run == list(calibration.schedule.full_steps)
    again = model.sample(steps=STEPS, seed=0, unet=compiled)  # after another generation
    assert torch.equal(again, first)


def test_full_steps_stay_exact_with_slicing_under_a_budget(model, calibration, rehashed):
    plan = rehashed[0].plan  # unsliced
    budget = 0.9 * plan.predicted_peak_bytes / 2**30
    compiled = fxstream.compile(model.unet, budget_gb=budget, rehash=calibration.config)
    rec = Recorder(compiled, eager=model.unet)
    model.sample(steps=STEPS, seed=0, unet=rec)
    assert compiled.plan.sliced_groups, "the budget must force slicing"
    assert compiled.plan.predicted_peak_bytes <= budget * 2**30
    assert compiled.plan.rehash.partial_predicted_activation_peak_bytes > 0
    assert compiled.rehash.full_steps_run == list(calibration.schedule.full_steps)
    assert rec.worst <= RTOL


def test_flops_at_13_of_25_full_steps(all_full, rehashed):
    full, rehash_run = all_full[1], rehashed[1]
    assert len(rehash_run.compiled.rehash.full_steps_run) == FULL
    measured = full.flops / rehash_run.flops
    assert measured >= 1.8
    # the plan's per-graph counts predict the same ratio (both runs use the same sliced graphs; slicing itself
    # can add FLOPs where a group recomputes its prefix in a second pass)
    info = rehash_run.compiled.plan.rehash
    predicted = STEPS * info.flops_full / (FULL * info.flops_full + (STEPS - FULL) * info.flops_partial)
    assert measured == pytest.approx(predicted, rel=0.02)


def test_calibration_maps_and_choice(model, calibration):
    n = STEPS
    for path, s in calibration.similarity.items():
        assert s.shape == (n, n)
        torch.testing.assert_close(s, s.T)
        torch.testing.assert_close(torch.diagonal(s), torch.ones(n), atol=1e-5, rtol=0)
        err = calibration.output_error[path]
        upper = torch.ones(n, n, dtype=torch.bool).triu()
        assert err.shape == (n, n) and torch.isnan(err[upper]).all()  # anchors are earlier steps only
        assert (err[~upper] >= 0).all()  # a cheap cut: every earlier anchor measured
    assert calibration.schedule.full_count(n) == FULL
    chosen = [r for r in calibration.rows() if r["chosen"] == "yes"]
    assert [r["cache_point"] for r in chosen] == [calibration.recommended.path]


def test_the_papers_cut_on_a_trained_model_is_reuse_of_the_previous_output(calibration):
    """After the decoder's last temporal layer only the output norm and convolution run: nothing of the current
    input reaches the output, whatever the feature's step-to-step similarity."""
    path = calibration.recommended.path
    assert calibration.similarity[path][1, 0] > 0.95  # self-similar ...
    assert calibration.error_over_reuse(path) == pytest.approx(1.0, abs=1e-4)  # ... and just reuse


def test_plan_stores_the_rehash_config_for_reuse(model, calibration, rehashed, tmp_path):
    compiled = rehashed[0]
    path = tmp_path / "plan.json"
    compiled.plan.to_json(path)
    info = Plan.from_json(path).rehash
    assert info.cache_point == calibration.recommended.path
    assert 0 < info.flops_partial < info.flops_full
    again = fxstream.compile(model.unet, rehash=str(path))
    assert again.rehash.config.cache_point == calibration.recommended.path
    assert again.rehash.config.schedule == calibration.schedule


def test_deepcache_style_cut_runs_through_the_same_machinery(model):
    """DeepCache's cut at the lowest budget, every other step full: 5 steps (full, rehash, full, rehash, full)
    run both of its graphs; the 25-step schedules are the calibrated config's, above."""
    steps = 5
    compiled = fxstream.compile(model.unet, rehash=RehashConfig("deepcache", Schedule.interval(2)))
    video = model.sample(steps=steps, seed=0, unet=compiled)
    assert torch.isfinite(video).all()
    assert compiled.plan.rehash.cache_point == "up_blocks.0"
    assert compiled.rehash.full_steps_run == [0, 2, 4]
    assert compiled.rehash.rehash_steps_run == [1, 3]
