"""Pass-level tests of Step Rehash: the partial graph, the full graph's store, cache points, FLOP counts
(``passes/rehash.py``), and Algorithm 1 / schedules on hand-made similarity maps (``fxstream/runtime/rehash.py``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fxstream.capture import capture
from fxstream.runtime.rehash import RehashConfig, RehashController, Schedule, as_config, key_steps, schedule_for
from passes import rehash

pytestmark = pytest.mark.usefixtures("one_thread")


class Up(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(torch.cat([x, skip], dim=1)))


class ToyUNet(nn.Module):
    """conv_in -> down -> mid -> up_blocks[0](mid, skip=down) -> up_blocks[1](.., skip=conv_in) -> conv_out,
    with a timestep embedding added after conv_in and again before conv_out."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.time = nn.Linear(1, c)
        self.down = nn.Conv2d(c, c, 3, padding=1)
        self.mid = nn.Conv2d(c, c, 3, padding=1)
        self.up_blocks = nn.ModuleList([Up(c), Up(c)])
        self.conv_out = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep.reshape(1, 1))[:, :, None, None]
        h0 = self.conv_in(sample) + emb
        h1 = self.down(h0)
        m = self.mid(h1)
        u0 = self.up_blocks[0](m, h1)
        u1 = self.up_blocks[1](u0, h0)
        return self.conv_out(u1 + emb)


def _toy():
    torch.manual_seed(0)
    model = ToyUNet().eval().requires_grad_(False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(3.0)
    return model, x, t, capture(model, x, t)


def _paths(gm: torch.fx.GraphModule) -> set[str]:
    """Module paths of the graph's operations (not the cache's load and store)."""
    return {p for n in gm.graph.nodes if n.op == "call_function" for p, _ in rehash._stack_paths(n)}


def test_module_output_is_the_tensor_used_outside_the_module():
    model, x, t, gm = _toy()
    node = rehash.module_output(gm, "up_blocks.0")
    assert node.meta["val"].shape == (2, 8, 8, 8)
    assert rehash._in_scope(node, "up_blocks.0")
    assert any(not rehash._in_scope(u, "up_blocks.0") for u in node.users)
    with pytest.raises(ValueError, match="no operation"):
        rehash.module_output(gm, "nope")


def test_partial_graph_keeps_what_follows_the_cache_point_and_the_skips_it_reads():
    model, x, t, gm = _toy()
    c = rehash.module_output(gm, "up_blocks.0")
    cache = rehash.FeatureCache()
    partial = rehash.partial_graph(gm, c.name, cache)
    kept = _paths(partial)
    # removed: what only fed the cache point
    assert not {"down", "mid", "up_blocks.0"} & kept
    # kept: the rest of the decoder, the skip it reads (conv_in) and the time embedding used after the cut
    assert {"up_blocks.1", "conv_out", "conv_in", "time"} <= kept
    # the cached feature enters through one load, and is stored again at the end (live for the whole step)
    loads = [n for n in partial.graph.nodes if n.op == "call_module" and n.target == rehash.LOAD_NAME]
    stores = [n for n in partial.graph.nodes if n.op == "call_module" and n.target == rehash.STORE_NAME]
    assert len(loads) == 1 and len(stores) == 1 and stores[0].args == (loads[0],)
    assert list(partial.graph.nodes)[-2] is stores[0]
    # same signature as the module: the same placeholders
    assert [n.name for n in partial.graph.nodes if n.op == "placeholder"] == [
        n.name for n in gm.graph.nodes if n.op == "placeholder"]
    # given the cached value, it computes the module's output
    with torch.no_grad():
        u0 = model.up_blocks[0](model.mid(model.down(model.conv_in(x) + model.time(t.reshape(1, 1))[:, :, None,
                                                                                                        None])),
                                model.down(model.conv_in(x) + model.time(t.reshape(1, 1))[:, :, None, None]))
    cache.value = u0
    torch.testing.assert_close(partial(x, t), model(x, t), rtol=0, atol=1e-6)


def test_partial_graph_without_a_cached_value_fails_clearly():
    _, x, t, gm = _toy()
    partial = rehash.partial_graph(gm, rehash.module_output(gm, "up_blocks.1").name, rehash.FeatureCache())
    with pytest.raises(RuntimeError, match="first step of a generation must be a full step"):
        partial(x, t)


def test_full_graph_stores_the_cache_point_and_returns_the_same_output():
    model, x, t, gm = _toy()
    c = rehash.module_output(gm, "up_blocks.1")
    cache = rehash.FeatureCache()
    full = rehash.full_graph(gm, c.name, cache)
    out = full(x, t)
    torch.testing.assert_close(out, model(x, t), rtol=0, atol=0)
    with torch.no_grad():
        h0 = model.conv_in(x) + model.time(t.reshape(1, 1))[:, :, None, None]
        h1 = model.down(h0)
        expected = model.up_blocks[1](model.up_blocks[0](model.mid(h1), h1), h0)
    torch.testing.assert_close(cache.value, expected, rtol=0, atol=1e-6)
    # the store is the last call: the cached value stays alive to the end of the step
    assert list(full.graph.nodes)[-2].target == rehash.STORE_NAME
    # the original graph is untouched
    assert not any(n.op == "call_module" and n.target == rehash.STORE_NAME for n in gm.graph.nodes)


def test_partial_graph_shares_parameters():
    _, _, _, gm = _toy()
    partial = rehash.partial_graph(gm, rehash.module_output(gm, "up_blocks.0").name, rehash.FeatureCache())
    ours = {id(p) for p in partial.parameters()}
    assert ours and ours <= {id(p) for p in gm.parameters()}


def test_flops_follow_the_conv_formula_and_the_partial_graph_counts_less():
    _, _, _, gm = _toy()
    # 2 * N * H * W * Cout * Cin * k * k per conv; linear 2 * 1 * 8
    conv = lambda cin, cout: 2 * 2 * 8 * 8 * cout * cin * 9  # noqa: E731
    expected = conv(4, 8) + conv(8, 8) + conv(8, 8) + 2 * conv(16, 8) + conv(8, 4) + 2 * 1 * 8
    assert rehash.graph_flops(gm) == expected
    c = rehash.module_output(gm, "up_blocks.0")
    partial_flops = rehash.graph_flops(gm, rehash.kept_nodes(gm, c))
    assert partial_flops == conv(4, 8) + conv(16, 8) + conv(8, 4) + 2 * 1 * 8


def test_candidates_and_deepcache_point_on_the_tiny_svd_unet():
    from fxstream import models

    m = models.build("svd", "tiny")
    gm = capture(m.module, *m.args, **m.kwargs)
    found = rehash.candidates(gm)
    assert found and all(c.path.startswith("up_blocks.") for c in found)
    assert {c.module_class for c in found} == {"SpatioTemporalResBlock", "TransformerSpatioTemporalModel"}
    fractions = [c.skipped_fraction for c in found]
    assert fractions == sorted(fractions)  # later in the decoder skips more
    best = rehash.resolve(gm, "auto")
    assert best.path == "up_blocks.1.attentions.1" and best.skipped_fraction > 0.95
    deep = rehash.deepcache_point(gm)
    assert deep.path == "up_blocks.0" and 0 < deep.skipped_fraction < best.skipped_fraction
    assert rehash.resolve(gm, "deepcache") == deep
    assert rehash.resolve(gm, "up_blocks.1.resnets.0").path == "up_blocks.1.resnets.0"


# ------------------------------------------------------------------------------------------------ Algorithm 1


def _map(adjacent: list[float]) -> torch.Tensor:
    """A similarity map where S[i][j] is the product of the adjacent similarities between j and i."""
    n = len(adjacent) + 1
    s = torch.ones(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            lo, hi = min(i, j), max(i, j)
            s[i, j] = math.prod(adjacent[lo:hi])
    return s


def test_key_steps_follow_algorithm_1():
    s = _map([0.99, 0.99, 0.9, 0.99, 0.99, 0.99])
    # anchor 0: S[1,0]=.99, S[2,0]=.98, S[3,0]=.882 < .95 -> key 3; anchor 3: .99, .98, .97 -> last step key
    assert key_steps(s, 0.95) == [0, 3, 6]
    assert key_steps(s, 0.0) == [0, 6]  # only the first and the last step
    assert key_steps(s, 1.01) == list(range(7))  # everything below the threshold: all steps full
    assert key_steps(torch.ones(1, 1), 0.5) == [0]


def test_key_steps_reanchor_at_each_key_step():
    s = torch.tensor([
        [1.0, 0.5, 0.4, 0.3],
        [0.5, 1.0, 0.96, 0.2],
        [0.4, 0.96, 1.0, 0.97],
        [0.3, 0.2, 0.97, 1.0],
    ])
    # step 1 < gamma vs anchor 0 -> key, anchor 1; step 2 vs 1 = .96 ok; step 3 vs 1 = .2 -> key
    assert key_steps(s, 0.9) == [0, 1, 3]


def test_schedule_for_hits_the_wanted_count():
    s = _map([0.999, 0.99, 0.9, 0.995, 0.98, 0.999, 0.97, 0.999, 0.999, 0.95])
    for k in range(1, 12):
        sched = schedule_for(s, k)
        assert sched.full_count(11) == max(k, 2) if k < 11 else 11
        assert sched.is_full(0) and sched.is_full(10)
    with pytest.raises(ValueError):
        schedule_for(s, 0)
    with pytest.raises(ValueError, match="square"):
        schedule_for(torch.ones(2, 3), 1)


def test_schedule_for_puts_full_steps_where_similarity_drops():
    adjacent = [0.999] * 24
    adjacent[20] = 0.5  # a sudden change between steps 20 and 21
    sched = schedule_for(_map(adjacent), 3)
    assert sched.full_steps == (0, 21, 24)


def test_schedules():
    assert [Schedule.interval(2).is_full(i) for i in range(5)] == [True, False, True, False, True]
    assert Schedule.interval(2).full_count(25) == 13
    assert Schedule.interval(3, num_steps=8).full_steps == ()
    assert [i for i in range(8) if Schedule.interval(3, num_steps=8).is_full(i)] == [0, 3, 6, 7]
    assert [i for i in range(6) if Schedule.steps([2, 4]).is_full(i)] == [0, 2, 4]  # step 0 always full
    with pytest.raises(ValueError):
        Schedule()
    with pytest.raises(ValueError):
        Schedule.interval(0)


def test_config_json_round_trip(tmp_path):
    cfg = RehashConfig("up_blocks.1.attentions.1", Schedule.steps([0, 3, 7], num_steps=8, gamma=0.97),
                       similarity=((1.0, 0.5), (0.5, 1.0)))
    path = tmp_path / "rehash.json"
    cfg.save(path)
    assert RehashConfig.load(path) == cfg
    assert as_config(str(path)) == cfg
    assert as_config(json.loads(path.read_text())) == cfg
    assert as_config(None) is None and as_config("off") is None
    assert as_config("auto") == RehashConfig()

    class Calibrated:  # what fxstream.calibrate returns carries its choice as .config
        config = cfg

    assert as_config(Calibrated()) == cfg
    with pytest.raises(ValueError):
        as_config(3)


def test_controller_infers_steps_from_timesteps_and_resets_on_a_new_generation():
    ctl = RehashController(RehashConfig(schedule=Schedule.interval(2)))
    decisions = []
    for t in [999.0, 800.0, 600.0, 400.0]:
        full = ctl.next_call(torch.tensor(t), key="k")
        if full:
            ctl.cache.value = torch.zeros(1)  # what the full graph's store does
        decisions.append((ctl.step, full))
    assert decisions == [(0, True), (1, False), (2, True), (3, False)]
    # a timestep that does not decrease starts a new generation: cache dropped, step 0, full
    assert ctl.next_call(torch.tensor(999.0), key="k") is True and ctl.step == 0
    assert ctl.history == [(0, True)]
    # an explicit step wins over inference; a different graph key forces a full step
    ctl.cache.value = torch.zeros(1)
    ctl.set_step(5)
    assert ctl.next_call(torch.tensor(1000.0), key="k") is False and ctl.step == 5
    assert ctl.next_call(torch.tensor(10.0), key="other") is True


def test_controller_schedule_can_change_between_generations():
    ctl = RehashController(RehashConfig("up_blocks.1", Schedule.interval(2)))
    ctl.set_schedule(Schedule.steps([0, 1, 4]))
    assert ctl.config.cache_point == "up_blocks.1" and ctl.config.schedule.full_steps == (0, 1, 4)
    ctl.begin_generation(num_steps=4)
    fulls = []
    for _ in range(4):
        full = ctl.next_call(None, key="k")
        ctl.cache.value = torch.zeros(1) if full else ctl.cache.value
        fulls.append(full)
    assert fulls == [True, True, False, True]  # step 3 is the last: full
    with pytest.raises(ValueError):
        ctl.set_schedule("every 2")
