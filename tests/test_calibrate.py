"""Step Rehash calibration on the model's output (``fxstream/calibrate.py``): the error maps on hand-made
denoisers whose right answers are known, the schedule search, the sensitivity, validation against a real
rehash run, and the argument checks."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch
from torch import nn

import fxstream
from fxstream.runtime.rehash import Schedule
from passes.rehash import CachePoint

cal_mod = importlib.import_module("fxstream.calibrate")  # the module; fxstream.calibrate is its function

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6


class Block(nn.Module):
    """An up block: ``resnets`` like diffusers' blocks, so its layers are ``up_blocks.K.resnets.I``."""

    def __init__(self, c_in: int, c: int, layers: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([nn.Conv2d(c_in if i == 0 else c, c, 3, padding=1) for i in range(layers)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        for i, r in enumerate(self.resnets):
            x = torch.tanh(r(x))
            if i == 0 and skip is not None:
                x = x + skip
        return x


class ToyDenoiser(nn.Module):
    """conv_in(+t) -> down -> up_blocks.0 -> up_blocks.1 (the skip from conv_in added after its first layer)
    -> conv_out.

    Nothing after ``up_blocks.1.resnets.1`` reads the current input: a rehash step cut there returns exactly
    the output of the step whose feature it reuses. After ``up_blocks.1.resnets.0`` the current input's skip
    is added."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(2, c, 3, padding=1)
        self.time = nn.Linear(1, c)
        self.down = nn.Conv2d(c, c, 3, padding=1)
        self.up_blocks = nn.ModuleList([Block(c, c, 1), Block(c, c, 2)])
        self.conv_out = nn.Conv2d(c, 2, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h0 = torch.tanh(self.conv_in(sample) + self.time(timestep.reshape(1, 1))[:, :, None, None])
        u0 = self.up_blocks[0](torch.tanh(self.down(h0)))
        return self.conv_out(self.up_blocks[1](u0, skip=h0))


def _toy() -> ToyDenoiser:
    torch.manual_seed(0)
    return ToyDenoiser().eval().requires_grad_(False)


def _sampler(steps: int = STEPS, seed: int = 0):
    """A deterministic Euler-like loop: x <- x - 0.2 * model(x, t), t decreasing; returns the final x."""

    def generate(unet):
        x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
        for i in range(steps):
            x = x - 0.2 * unet(x, torch.tensor(float(steps - i)))
        return x

    return generate


@pytest.fixture(scope="module")
def toy_calibration():
    toy = _toy()
    return toy, fxstream.calibrate(toy, _sampler(), full_steps=3, sensitivity_points=STEPS)


def test_candidates_are_every_layer_of_the_last_up_blocks_and_the_deepcache_cut(toy_calibration):
    _, cal = toy_calibration
    assert [c.path for c in cal.candidates] == ["up_blocks.0.resnets.0", "up_blocks.0", "up_blocks.1.resnets.0",
                                                "up_blocks.1.resnets.1"]


def test_a_layer_whose_output_is_its_blocks_is_listed_once_as_the_deepcache_cut():
    from fxstream.capture import capture
    from passes.rehash import layer_candidates

    class Plain(Block):  # the block's output is its last layer's
        def forward(self, x, skip=None):
            for r in self.resnets:
                x = r(x)
            return x

    toy = _toy()
    toy.up_blocks[0] = Plain(6, 6, 1)
    gm = capture(toy, torch.randn(1, 2, 8, 8), torch.tensor(1.0))
    paths = [c.path for c in layer_candidates(gm)]
    assert paths == ["up_blocks.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]


def test_a_cut_after_which_nothing_reads_the_input_scores_as_reuse_of_the_previous_output(toy_calibration):
    _, cal = toy_calibration
    deepest = cal.output_error["up_blocks.1.resnets.1"]
    measured = ~torch.isnan(deepest)
    assert measured.sum() == STEPS * (STEPS - 1) // 2  # a cheap cut: every earlier anchor
    torch.testing.assert_close(deepest[measured], cal.reuse_error[measured], rtol=1e-5, atol=1e-7)
    assert cal.error_over_reuse("up_blocks.1.resnets.1") == pytest.approx(1.0, abs=1e-5)
    # the cut before it reads the current input's skip: not the same as reuse
    assert abs(cal.error_over_reuse("up_blocks.1.resnets.0") - 1.0) > 1e-3


def test_output_error_is_that_of_the_eager_model_with_the_cut_replaced(toy_calibration):
    """One cell of the map, computed independently: eager, the cut module's output swapped for its value at
    the anchor step by a forward hook."""
    toy, cal = toy_calibration
    inputs, features = [], []
    layer = toy.get_submodule("up_blocks.1.resnets.0")
    h1 = layer.register_forward_hook(lambda m, a, o: features.append(o))
    h2 = toy.register_forward_pre_hook(lambda m, a: inputs.append(a))
    final = _sampler()(toy)
    h1.remove(), h2.remove()
    i, j = 4, 2
    full = toy(*inputs[i])
    h = layer.register_forward_hook(lambda m, a, o: features[j])
    partial = toy(*inputs[i])
    h.remove()
    expected = ((partial - full).norm() / full.norm()).item()
    assert cal.output_error["up_blocks.1.resnets.0"][i, j].item() == pytest.approx(expected, rel=1e-4)
    assert cal.final_norm == pytest.approx(final.norm().item(), rel=1e-6)


def test_sensitivity_is_the_final_change_per_output_change():
    """A sampler whose later steps do not read x: final = x0 - sum h_i * out_i, so an output change at step i
    moves the final sample by exactly h_i times as much."""
    toy = _toy()
    weights = [0.5, 0.1, 0.2, 0.3, 0.4, 0.6]

    def generate(unet):
        x0 = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
        final = x0.clone()
        for i, h in enumerate(weights):
            final = final - h * unet(x0, torch.tensor(float(10 - i)))
        return final

    cal = fxstream.calibrate(toy, generate, full_steps=3, sensitivity_points=len(weights), validate=0)
    inner = cal.sensitivity[1:-1]
    torch.testing.assert_close(inner, torch.tensor(weights[1:-1], dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_the_chosen_options_measured_error_is_that_of_a_real_rehash_run(toy_calibration):
    toy, cal = toy_calibration
    assert cal.chosen.measured_error is not None
    compiled = fxstream.compile(toy, rehash=cal.config)
    full = _sampler()(toy)
    run = _sampler()(compiled)
    assert compiled.rehash.full_steps_run == [i for i in range(STEPS) if cal.schedule.is_full(i)]
    measured = ((run - full).norm() / full.norm()).item()
    assert cal.chosen.measured_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
    validated = [o for o in cal.options if o.measured_error is not None]
    assert cal.chosen.measured_error == min(o.measured_error for o in validated)


def test_the_module_is_left_as_it_was(toy_calibration):
    toy, _ = toy_calibration
    assert toy.__dict__.get("_compiled_call_impl") is None
    with pytest.raises(ValueError, match="not deterministic"):
        seeds = iter(range(100))
        fxstream.calibrate(toy, lambda u: _sampler(seed=next(seeds))(u), full_steps=3)
    assert toy.__dict__.get("_compiled_call_impl") is None
    x, t = torch.randn(1, 2, 8, 8), torch.tensor(1.0)
    assert torch.equal(toy(x, t), toy.forward(x, t))


def test_a_speedup_target_takes_the_most_full_steps_that_reach_it(toy_calibration):
    _, cal = toy_calibration
    two = cal.choose(speedup=1.3, validate=0)
    assert two.target.speedup == 1.3
    for o in two.options:
        assert o.flops_ratio >= 1.3 - 1e-9
        k = o.schedule.full_count(STEPS)
        if k < STEPS:  # one more full step would miss the target
            assert cal_mod.flops_ratio(o.cut, STEPS, k + 1) < 1.3
    # a cut that cannot reach it is named with the most it reaches, not offered
    offered = {o.cut.path for o in two.options}
    for c in cal.candidates:
        assert (c.path in offered) != (c.path in two.unreachable)
        if c.path in two.unreachable:
            assert two.unreachable[c.path] == pytest.approx(cal_mod.flops_ratio(c, STEPS, 2))
            assert two.unreachable[c.path] < 1.3
    with pytest.raises(ValueError, match="no cut reaches"):
        cal.choose(speedup=100.0)
    assert "yes" in [r["chosen"] for r in two.rows()]
    assert "target: 1.30x" in two.table()


def _cut(full: int, partial: int) -> CachePoint:
    return CachePoint("up_blocks.1.x.0", "X", "n", full, partial, 4)


def test_most_full_steps_follows_the_flops_formula():
    cut = _cut(100, 0)  # a rehash step is free: the ratio is N / full steps
    assert cal_mod.most_full_steps(cut, 10, 2.0) == 5
    assert cal_mod.most_full_steps(cut, 10, 2.1) == 4
    assert cal_mod.most_full_steps(cut, 10, 6.0) is None  # at least steps 0 and 9
    half = _cut(100, 50)  # a rehash step costs half a full one
    assert cal_mod.most_full_steps(half, 10, 1.5) == 3
    assert cal_mod.flops_ratio(half, 10, 3) == pytest.approx(10 / 6.5)
    assert cal_mod.flops_ratio(half, 10, 4) == pytest.approx(10 / 7)


def test_least_cost_schedule_is_the_best_of_all_schedules():
    torch.manual_seed(0)
    n = 7
    cost = torch.rand(n, n).double()
    cost[5, 0] = math.inf  # an unmeasured pair: no schedule may rely on it
    for k in range(2, n + 1):
        best = cal_mod.least_cost_schedule(cost, k)
        brute = min(
            (cal_mod.predicted_error(cost, Schedule.steps([0, *mid, n - 1], num_steps=n)), mid)
            for mid in itertools.combinations(range(1, n - 1), k - 2))
        if brute[0] == math.inf:  # k = 2: step 5 can only be a rehash step from step 0
            assert best is None
            continue
        assert best.full_count(n) == k
        assert cal_mod.predicted_error(cost, best) == pytest.approx(brute[0])
    only_far = torch.full((n, n), math.inf, dtype=torch.float64)
    assert cal_mod.least_cost_schedule(only_far, 2) is None


def test_predicted_error_sums_the_rehash_steps_from_their_anchor():
    cost = torch.arange(36, dtype=torch.float64).reshape(6, 6)
    schedule = Schedule.steps([0, 3], num_steps=6)  # full 0, 3, 5; rehash 1, 2 (from 0) and 4 (from 3)
    assert cal_mod.predicted_error(cost, schedule) == cost[1, 0] + cost[2, 0] + cost[4, 3]


def test_output_similarity_marks_unmeasured_pairs_as_key_steps():
    err = torch.tensor([[0.0, float("nan")], [0.25, 0.0]])
    assert cal_mod.output_similarity(err).tolist() == [[1.0, -1.0], [0.75, 1.0]]


def test_bad_arguments_are_named():
    toy = _toy()
    gen = _sampler()
    for kwargs, name in ((dict(speedup=0.5), "speedup"), (dict(full_steps=0), "full_steps"),
                         (dict(generations=0), "generations"), (dict(max_gap=0), "max_gap"),
                         (dict(validate=-1), "validate"), (dict(speedup=2.0, full_steps=3), "not both"),
                         (dict(generations=2), "generate\\(unet, index\\)")):
        with pytest.raises(ValueError, match=name):
            fxstream.calibrate(toy, gen, **kwargs)
    with pytest.raises(ValueError, match="never called"):
        fxstream.calibrate(toy, lambda u: None)


def test_generations_average_the_maps_and_take_an_index():
    toy = _toy()

    def generate(unet, index):
        return _sampler(seed=index)(unet)

    one = fxstream.calibrate(toy, lambda u: generate(u, 0), full_steps=3, validate=0, sensitivity_points=0)
    two = fxstream.calibrate(toy, generate, full_steps=3, validate=1, sensitivity_points=0, generations=2)
    other = fxstream.calibrate(toy, lambda u: generate(u, 1), full_steps=3, validate=0, sensitivity_points=0)
    path = "up_blocks.1.resnets.0"
    torch.testing.assert_close(two.output_error[path], (one.output_error[path] + other.output_error[path]) / 2,
                               equal_nan=True)
    torch.testing.assert_close(two.sensitivity, torch.ones(STEPS, dtype=torch.float64))
    # validation runs both generations; the error is their geometric mean (what a mean PSNR averages)
    compiled = fxstream.compile(toy, rehash=two.config)
    errors = []
    for index in range(2):
        full, run = generate(toy, index), generate(compiled, index)
        errors.append(((run - full).norm() / full.norm()).item())
    assert two.chosen.measured_error == pytest.approx(math.sqrt(errors[0] * errors[1]), rel=1e-3)


def test_validation_order_puts_the_papers_option_first_then_each_method_and_cut():
    def option(path, method, error):
        return cal_mod.RehashOption(CachePoint(path, "X", path, 100, 10, 4), Schedule.interval(2), method, 2.0,
                                    error)

    a_least = option("a", cal_mod.LEAST_ERROR, 0.1)
    a_uniform = option("a", cal_mod.UNIFORM, 0.2)
    b_least = option("b", cal_mod.LEAST_ERROR, 0.3)
    b_feature = option("b", cal_mod.ALGORITHM1_FEATURE, 0.9)
    c_least = option("c", cal_mod.LEAST_ERROR, 0.5)
    a_feature = option("a", cal_mod.ALGORITHM1_FEATURE, 0.95)
    ranked = [a_least, a_uniform, b_least, c_least, b_feature, a_feature]
    order = cal_mod.validation_order(ranked, reference="a")
    assert order == [a_feature, a_least, a_uniform, b_feature, b_least, c_least]
    assert cal_mod.validation_order(ranked, reference=None) == [a_least, a_uniform, b_feature, b_least, c_least,
                                                                a_feature]


def test_refine_moves_full_steps_while_the_measured_error_drops():
    n = 8
    zeros = torch.zeros(n, n, dtype=torch.float64)
    cut = CachePoint("up_blocks.1.x.0", "X", "n", 100, 10, 4)
    measured = cal_mod.Measurements([cut], n, {cut.path: zeros}, {cut.path: zeros}, zeros, {cut.path: zeros},
                                    torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64), 1.0)
    best_steps = [0, 3, 5, 7]
    runs = []

    def validator(c, schedule):  # the measured error: how far the full steps are from the best ones
        runs.append(schedule)
        full = [i for i in range(n) if schedule.is_full(i)]
        return 0.1 + sum(abs(a - b) for a, b in zip(full, best_steps))

    start = cal_mod.RehashOption(cut, Schedule.steps([0, 2, 4, 7], num_steps=n), cal_mod.LEAST_ERROR, 2.0, 0.0,
                                 validator(cut, Schedule.steps([0, 2, 4, 7], num_steps=n)))
    found = cal_mod.refine(measured, start, budget=20, validator=validator)
    assert found.schedule == Schedule.steps(best_steps, num_steps=n)
    assert found.method == cal_mod.REFINED and found.measured_error == pytest.approx(0.1)
    assert found.flops_ratio == start.flops_ratio
    assert all(s.full_count(n) == 4 for s in runs)  # every move keeps the count, and so the FLOPs
    assert cal_mod.refine(measured, start, budget=1, validator=validator).measured_error >= 1.1  # one run: one move


def test_calibrating_through_a_diffusers_pipeline_and_optimizing_it_with_the_result():
    """The documented path: generate() calls the pipeline (latents out), and optimize takes the calibration."""
    from fxstream import pipelines

    pipe = pipelines.build("animatediff")

    def generate(unet):
        pipe.unet = unet
        return pipe(prompt="a cat", num_inference_steps=4, num_frames=4, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="latent").frames

    cal = fxstream.calibrate(pipe.unet, generate, speedup=1.2, cache_points=["auto", "deepcache"],
                             sensitivity_points=2, validate=2)
    assert cal.num_steps == 4 and cal.chosen.measured_error is not None
    assert cal.final_norm == pytest.approx(generate(pipe.unet).norm().item(), rel=1e-5)
    opt = fxstream.optimize(pipe, budget_gb=1024, rehash=cal)
    try:
        generate(pipe.unet)
        assert opt.rehash.full_steps_run == [i for i in range(4) if cal.schedule.is_full(i)]
        assert opt.rehash.config.cache_point == cal.chosen.cut.path
    finally:
        opt.restore()
