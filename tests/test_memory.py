"""passes.memory: activation-memory timelines from fake values, checked by hand and against measurement."""

from __future__ import annotations

import functools
import json
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import fxstream
from fxstream.capture import capture, normalize_inputs
from fxstream.measure import measure
from passes.memory import (
    TOP_LEVEL,
    MemoryTimeline,
    analyze_memory,
    format_report,
    sdpa_workspace_bytes,
)
from passes.meta import node_info

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # On a shared 2-core machine, OpenMP threads spin-waiting for a busy core make forwards 2-3x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N = 128  # tensors below are N x N fp32: one "unit" U of 64 KiB
U = N * N * 4


def unit() -> torch.Tensor:
    return torch.randn(N, N)


def live_at(timeline: MemoryTimeline, node_name: str) -> int:
    return timeline.live_bytes[timeline.nodes.index(node_name)]


def node_named(gm: torch.fx.GraphModule, target) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.target is target)


def check_against_measurement(module: nn.Module, *args) -> tuple[MemoryTimeline, MemoryTimeline]:
    """Estimate both lifetimes and assert each equals what running it measures (tiny modules are exact)."""
    gm = capture(module, *args)
    flat_args, flat_kwargs = normalize_inputs(module, args, {})
    graph = analyze_memory(gm, lifetime="graph")
    eager = analyze_memory(gm, lifetime="eager")
    assert graph.activation_peak_bytes == measure(gm, *flat_args, **flat_kwargs).activation_peak_bytes
    assert eager.activation_peak_bytes == measure(module, *args).activation_peak_bytes
    return graph, eager


# ------------------------------------------------------------------------------------------- aliasing


class ViewKeepsBase(nn.Module):
    def forward(self, x):
        a = x + 1
        v = a.t()  # a view: a's storage must live until v's last user
        b = x * 2
        c = b * 3
        return v + c


def test_a_view_keeps_its_base_alive_until_the_views_last_user():
    gm = capture(ViewKeepsBase(), unit())
    t = analyze_memory(gm)
    # While c = b * 3 runs: a (held through its view), b and c.
    c = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor and n.args[1] == 3)
    assert live_at(t, c.name) == 3 * U
    assert t.activation_peak_bytes == 3 * U
    check_against_measurement(ViewKeepsBase(), unit())


class SeveralUsers(nn.Module):
    def forward(self, x):
        a = x + 1
        b = a * 2
        c = x * 3
        d = a + c  # a's last user
        return b + d


def test_a_value_with_several_users_lives_until_the_last():
    gm = capture(SeveralUsers(), unit())
    t = analyze_memory(gm)
    names = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    # a, b, c, d while d runs; then a and c are freed: b, d and the output.
    assert live_at(t, names[3]) == 4 * U
    assert live_at(t, names[4]) == 3 * U
    check_against_measurement(SeveralUsers(), unit())


class OutputEarly(nn.Module):
    def forward(self, x):
        a = x + 1
        b = x * 2
        c = b * 3
        return a, c


def test_graph_outputs_stay_alive_to_the_end():
    gm = capture(OutputEarly(), unit())
    t = analyze_memory(gm)
    assert t.live_bytes[-1] == 2 * U  # at the output node: a and c
    assert live_at(t, [n.name for n in gm.graph.nodes if n.op == "call_function"][2]) == 3 * U
    assert t.output_bytes == 2 * U
    check_against_measurement(OutputEarly(), unit())


class EvalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        a = x + 1
        h = self.drop(a)
        return h * 2


def test_eval_dropout_aliases_its_input():
    module = EvalDropout().eval()
    gm = capture(module, unit())
    dropout = node_named(gm, torch.ops.aten.dropout.default)
    # The fake value has a fresh storage (pitfall 6), eager returns the input itself.
    assert dropout.meta["val"].untyped_storage() is not dropout.args[0].meta["val"].untyped_storage()
    t = analyze_memory(gm)
    assert live_at(t, dropout.name) == U
    check_against_measurement(module, unit())


def test_hand_built_graph_without_shared_fake_storages_still_aliases_views():
    # Values propagated one node at a time share no fake storage: the rule table must supply the aliasing.
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.add.Tensor, (x, 1))
    v = g.call_function(torch.ops.aten.transpose.int, (a, 0, 1))
    r = g.call_function(torch.ops.aten.reshape.default, (v, [N * N]))  # not viewable: a copy
    s = g.call_function(torch.ops.aten.view.default, (a, [N * N]))
    g.output((r, s))
    gm = torch.fx.GraphModule(nn.Module(), g)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta["val"] = torch.empty(N, N, device="meta")
        elif node.op == "call_function":
            args = [arg.meta["val"] if isinstance(arg, torch.fx.Node) else arg for arg in node.args]
            node.meta["val"] = node.target(*args).clone()  # a fresh storage each
    t = analyze_memory(gm)
    assert t.activation_peak_bytes == 2 * U  # a (with its views v and s) and the reshape copy
    assert t.output_bytes == 2 * U


# ------------------------------------------------------------------------------------------ workspace


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v) * 2


def _attention_graph(shape):
    q, k, v = (torch.randn(shape) for _ in range(3))
    return capture(Attention(), q, k, v), (q, k, v)


def test_sdpa_math_counts_the_attention_matrix_and_flash_does_not():
    b, h, length, e = 1, 2, 256, 16
    gm, _ = _attention_graph((b, h, length, e))
    sdpa = node_named(gm, torch.ops.aten.scaled_dot_product_attention.default)
    out = b * h * length * e * 4
    scores = b * h * length * length * 4
    assert sdpa_workspace_bytes(sdpa, "math") == out + 2 * scores - out  # scaled query + matrix + softmax
    assert sdpa_workspace_bytes(sdpa, "flash") == b * h * length * 4  # logsumexp
    assert sdpa_workspace_bytes(sdpa, "efficient") == b * h * 256 * 4
    math_peak = analyze_memory(gm, sdpa_backend="math")
    flash_peak = analyze_memory(gm, sdpa_backend="flash")
    assert live_at(math_peak, sdpa.name) == out + out + 2 * scores - out
    assert live_at(flash_peak, sdpa.name) == out + b * h * length * 4
    assert flash_peak.activation_peak_bytes == 2 * out  # the sdpa output and the product
    assert math_peak.activation_peak_bytes > scores


def test_sdpa_backend_follows_the_target():
    gm4, args4 = _attention_graph((1, 2, 256, 16))
    gm3, args3 = _attention_graph((2, 256, 16))
    # CPU runs flash attention for 4-D inputs, and the math path for 3-D ones (checked by measurement).
    for gm, args, heavy in ((gm4, args4, False), (gm3, args3, True)):
        t = analyze_memory(gm, target="cpu")
        assert (t.activation_peak_bytes > 256 * 256 * 4) == heavy
        assert t.activation_peak_bytes == measure(gm, *args).activation_peak_bytes
    # CUDA never takes the math path on its own.
    assert analyze_memory(gm3, target="cuda").activation_peak_bytes < 256 * 256 * 4


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Conv2d(8, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.pointwise(self.wide(x))


def test_cuda_convolutions_wider_than_1x1_transpose_input_and_output():
    x = torch.randn(2, 8, 64, 64)
    gm = capture(Convs(), x)
    wide, pointwise = (n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    cuda, cpu = analyze_memory(gm, target="cuda"), analyze_memory(gm, target="cpu")
    size = x.numel() * 4
    assert live_at(cuda, wide.name) == live_at(cpu, wide.name) + 2 * size
    assert live_at(cuda, pointwise.name) == live_at(cpu, pointwise.name) == 2 * size


class TwoOps(nn.Module):
    def forward(self, x):
        a = x + 1
        return a * 2


def test_workspace_bytes_from_node_info_are_added_while_the_node_runs():
    gm = capture(TwoOps(), unit())
    add = node_named(gm, torch.ops.aten.add.Tensor)
    node_info(add).workspace_bytes = 5 * U
    t = analyze_memory(gm)
    assert live_at(t, add.name) == 6 * U
    assert t.peak_node == add.name
    assert any(x.workspace and x.nbytes == 5 * U for x in t.live_at_peak)


class TwoOutputs(nn.Module):
    def forward(self, x):
        return x * 2, x + 1


def test_call_module_node_with_a_tuple_value_and_workspace():
    root = nn.Module()
    root.group = TwoOutputs()
    g = torch.fx.Graph()
    x = g.placeholder("x")
    call = g.call_module("group", (x,))
    first = g.call_function(operator.getitem, (call, 0))
    second = g.call_function(operator.getitem, (call, 1))
    g.output(g.call_function(torch.ops.aten.add.Tensor, (first, second)))
    gm = torch.fx.GraphModule(root, g)
    FakeTensorProp(gm).propagate(unit())
    node_info(call).workspace_bytes = 4 * U  # an outlined group's per-slice intermediates
    t = analyze_memory(gm)
    assert live_at(t, call.name) == 2 * U + 4 * U
    assert live_at(t, first.name) == 2 * U
    assert t.live_bytes[-2] == 3 * U  # the final add: both outputs of the group and its result
    assert t.activation_peak_bytes == 6 * U
    assert t.peak_node == call.name


# -------------------------------------------------------------------------------------- eager lifetimes


class Inner(nn.Module):
    def forward(self, x):
        y = x * 2
        return y * 3


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        a = x + 1
        return self.inner(a)


def test_eager_keeps_module_arguments_until_the_call_returns():
    graph, eager = check_against_measurement(Outer(), unit())
    # Graph: a is freed once y exists. Eager: Outer's frame holds a, Inner's holds y, until the call returns.
    assert graph.activation_peak_bytes == 2 * U
    assert eager.activation_peak_bytes == 3 * U


class HeldLocal(nn.Module):
    def forward(self, x):
        h = x * 2
        h = h * 3  # rebinding h frees x * 2
        out = (x + h) / 2  # h stays bound while the sum and the quotient are computed
        return out


def test_eager_keeps_local_variables_until_reassigned_or_returned():
    graph, eager = check_against_measurement(HeldLocal(), unit())
    assert graph.activation_peak_bytes == 2 * U
    assert eager.activation_peak_bytes == 3 * U


# ---------------------------------------------------------------------------- blocks, totals, reports


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(N, N), nn.Linear(N, N)])
        self.head = nn.Linear(N, N, bias=False)

    def forward(self, x):
        for block in self.blocks:
            x = block(x).relu()
        return self.head(x) + 1


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = Net()

    def forward(self, x):
        return self.decoder(x)


def test_blocks_weights_inputs_and_outputs():
    t = analyze_memory(capture(Net(), unit()))
    assert [b.block for b in t.blocks] == ["blocks.0", TOP_LEVEL, "blocks.1", "head"]  # in order of first op
    assert all(b.peak_bytes > 0 for b in t.blocks)
    assert max(b.peak_bytes for b in t.blocks) == t.activation_peak_bytes
    assert t.weight_bytes == 3 * N * N * 4 + 2 * N * 4
    assert t.input_bytes == U
    assert t.output_bytes == U


def test_blocks_are_named_below_a_wrapper_module():
    t = analyze_memory(capture(Wrapper(), unit()))
    assert [b.block for b in t.blocks] == ["blocks.0", TOP_LEVEL, "blocks.1", "head"]  # in order of first op


def test_timeline_is_json_friendly_and_reported():
    t = analyze_memory(capture(Net(), unit()), lifetime="eager", top=3)
    data = json.loads(json.dumps(t.to_dict()))
    assert MemoryTimeline.from_dict(data) == t
    assert len(t.live_at_peak) == 3
    assert t.live_at_peak == sorted(t.live_at_peak, key=lambda x: x.nbytes, reverse=True)
    assert len(t.nodes) == len(t.live_bytes)
    report = format_report(t)
    for text in ("weights", "activation peak", t.peak_node, "blocks.1", "total at peak"):
        assert text in report


def test_bad_options_name_the_argument():
    gm = capture(TwoOps(), unit())
    for kwargs, name in (({"lifetime": "python"}, "lifetime"), ({"target": "tpu"}, "target"),
                         ({"sdpa_backend": "cudnn"}, "sdpa_backend"), ({"top": -1}, "top")):
        with pytest.raises(ValueError, match=name):
            analyze_memory(gm, **kwargs)


def test_estimate_captures_and_analyzes():
    t = fxstream.estimate(Outer(), unit())
    assert t.lifetime == "eager" and t.target == "cpu"
    assert t.activation_peak_bytes == 3 * U
    assert fxstream.estimate(Outer(), unit(), lifetime="graph").activation_peak_bytes == 2 * U
    with pytest.raises(ValueError, match="lifetime"):
        fxstream.estimate(Outer(), unit(), lifetime="python")


# ------------------------------------------------------------------------------------- real models

MODELS = [
    ("svd", "tiny"),
    pytest.param("svd", "medium", marks=pytest.mark.slow),
    ("animatediff", "tiny"),
    pytest.param("animatediff", "medium", marks=pytest.mark.slow),
    ("svd-vae-decoder", "tiny"),
    pytest.param("svd-vae-decoder", "medium", marks=pytest.mark.slow),
]
TOLERANCE = 0.10  # ARCHITECTURE.md, "Honest memory"


@functools.lru_cache(maxsize=None)
def _captured(name: str, size: str):
    built = fxstream.models.build(name, size)
    gm = capture(built.module, *built.args, **built.kwargs)
    args, kwargs = normalize_inputs(built.module, built.args, built.kwargs)
    return built, gm, args, kwargs


@pytest.mark.parametrize("name, size", MODELS)
def test_eager_estimate_matches_measured_eager_forward(name, size):
    built, gm, _, _ = _captured(name, size)
    predicted = analyze_memory(gm, lifetime="eager", target="cpu").activation_peak_bytes
    measured = measure(built.module, *built.args, **built.kwargs).activation_peak_bytes
    assert abs(predicted / measured - 1) <= TOLERANCE, (predicted, measured)


@pytest.mark.parametrize("name, size", MODELS)
def test_graph_estimate_matches_measured_graph_module(name, size):
    _, gm, args, kwargs = _captured(name, size)
    predicted = analyze_memory(gm, lifetime="graph", target="cpu").activation_peak_bytes
    measured = measure(gm, *args, **kwargs).activation_peak_bytes
    assert abs(predicted / measured - 1) <= TOLERANCE, (predicted, measured)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["svd", "svd-vae-decoder"])
def test_cuda_estimates_match_max_memory_allocated(name):
    built = fxstream.models.build(name, "tiny", device="cuda")
    gm = capture(built.module, *built.args, **built.kwargs)
    args, kwargs = normalize_inputs(built.module, built.args, built.kwargs)
    with torch.no_grad():  # warm-up: cuBLAS and cuDNN handles and workspaces exist before measuring
        built.module(*built.args, **built.kwargs)
    for lifetime, fn, fn_args, fn_kwargs in (("eager", built.module, built.args, built.kwargs),
                                             ("graph", gm, args, kwargs)):
        predicted = analyze_memory(gm, lifetime=lifetime, target="cuda").activation_peak_bytes
        measured = measure(fn, *fn_args, **fn_kwargs).activation_peak_bytes
        assert abs(predicted / measured - 1) <= TOLERANCE, (lifetime, predicted, measured)
