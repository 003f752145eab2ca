"""Measure the time model's op costs on the machine at hand (:class:`passes.timing.DeviceCosts`).

    costs = fxstream.timing.measure_costs()          # this CPU (or device="cuda")
    passes.timing.use_costs(costs)                    # plan with it from now on
    costs.to_json("my-costs.json")

What is measured:

* ``op_s``: one op of a generated graph (a chain of additions on 16-element tensors, per op);
* ``loop_s``: one instruction of a band program (:class:`fxstream.runtime.rows.RowStream` running a chain of
  additions on bands of a tiny tensor, with the frees a real program has);
* ``call_s``: one slice of a sliced group's loop beyond its body's ops
  (:class:`fxstream.runtime.sliced.SlicedCall` with a one-op body on a tiny tensor);
* the rates and bandwidths of each class, op and size: every node of real captured models (the zoo's medium
  models, random weights) is timed alone, and a large one also on a band of ``BAND_ROWS`` rows (as row
  streaming runs it); each rate is the FLOPs (or bytes) summed over its nodes, over their time summed (less
  their dispatch), so large ops weigh as they do in a real call.

``benchmarks/device_costs.py`` writes the shipped CPU table; ``benchmarks/cpu.py`` sets the predictions beside
measured calls (eager, and plans at the minimum and a middle budget).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable

import torch
import torch.fx
from torch import nn

from fxstream.runtime.rows import conv_rows
from passes import ops
from passes.timing import COMPUTE, MEMORY, SMALL_BYTES, DeviceCosts, key_chain, node_costs, size_class

CALIBRATION_MODELS = ("animatediff", "modelscope", "sd-vae-decoder", "svd", "svd-vae-decoder", "wan-vae-decoder",
                      "hunyuanvideo-vae-decoder", "ltx-vae-decoder", "cogvideox-vae-decoder", "mochi-vae-decoder")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _chain_graph(n: int) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    for _ in range(n):
        x = graph.call_function(torch.ops.aten.add.Tensor, (x, 1.0))
    graph.output(x)
    return torch.fx.GraphModule(nn.Module(), graph)


def dispatch_costs(device: str | torch.device = "cpu", ops: int = 400, repeats: int = 20) -> dict[str, float]:
    """``op_s``, ``loop_s`` and ``call_s`` measured on tiny tensors (see the module docstring)."""
    from fxstream.runtime.rows import Band, RowStream
    from fxstream.runtime.sliced import SlicedCall, SlicedInput, SlicedOutput, SlicePass

    device = torch.device(device)
    x = torch.zeros(1, 1, 16, device=device)
    gm = _chain_graph(ops)
    op_s = _best(lambda: gm(x), device, repeats) / ops
    program = []
    for i in range(ops):
        src = Band(0, 2, 0, 16) if i == 0 else Band(i, None)
        program.append(("op", i + 1, torch.ops.aten.add.Tensor, (src, 1.0), {}, None, 64))
        if i:
            program.append(("free", [i]))
    program.append(("out", Band(ops, None), (0, 16), 0))
    program.append(("free", [ops]))
    stream = RowStream("calibration", [program], (1, 1, 16), torch.float32, 2, num_passes=1, bands=1)
    loop_s = _best(lambda: stream(x), device, repeats) / (ops + 1)
    slices = 64
    wide = torch.zeros(slices, 4, device=device)
    body = _chain_graph(1)
    call = SlicedCall("calibration", [SlicePass({1: _Tuple(body)}, [0], [])], slices, slices, [SlicedInput(0)],
                      [SlicedOutput((slices, 4), torch.float32, 0)], num_outputs=1)
    call_s = max(_best(lambda: call(wide), device, repeats) / slices - op_s, 0.0)
    return {"op_s": op_s, "loop_s": loop_s, "call_s": call_s}


class _Tuple(nn.Module):
    """A slice body returns a tuple of its targets."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return (self.gm(*args),)


# A large op is also timed on a band of this many rows of its first input (its second-to-last dim), as a
# row-streamed segment runs it.
BAND_ROWS = 8


class _TimedInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, device: torch.device):
        super().__init__(gm)
        self.device = device
        self.times: dict[torch.fx.Node, float] = {}
        self.bands: dict[torch.fx.Node, tuple[float, float]] = {}  # node -> (seconds, share of the whole)

    def _timed(self, n, args, kwargs, target=None):
        _sync(self.device)
        start = time.perf_counter()
        out = getattr(self, n.op)(target or n.target, args, kwargs)
        _sync(self.device)
        return out, time.perf_counter() - start

    def run_node(self, n: torch.fx.Node):
        if n.op != "call_function":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        out, took = self._timed(n, args, kwargs)
        self.times[n] = min(self.times.get(n, took), took)
        band = _band_args(n, args, out)
        if band is not None:  # a convolution as a band program runs it (fxstream.runtime.rows.conv_rows)
            b_out, b_took = self._timed(n, band, kwargs, conv_rows if n.target is ops.CONVOLUTION else None)
            share = b_out.numel() / out.numel()
            prev = self.bands.get(n)
            self.bands[n] = (b_took, share) if prev is None or b_took < prev[0] else prev
        return out


def _band_args(n: torch.fx.Node, args: tuple, out) -> tuple | None:
    """``args`` with the first input narrowed to a band of rows, for a large convolution or a one-input
    elementwise op or norm (whose output a band of input rows maps to); None for any other node."""
    from passes.timing import op_class

    kind = op_class(n)
    if not isinstance(out, torch.Tensor) or out.dim() < 4 or out.numel() * out.element_size() <= SMALL_BYTES:
        return None
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() != out.dim() or x.shape[-2] < 4 * BAND_ROWS:
        return None
    others = [a for a in args[1:] if isinstance(a, torch.Tensor) and a.dim() == x.dim()]
    if kind not in ("conv", "norm", "pointwise") or (kind != "conv" and others):
        return None
    return (x.narrow(-2, 0, BAND_ROWS), *args[1:])


def node_times(gm: torch.fx.GraphModule, args: tuple, device: torch.device, repeats: int = 2
               ) -> tuple[dict[torch.fx.Node, float], dict[torch.fx.Node, tuple[float, float]]]:
    """Each ``call_function`` node's least time over ``repeats`` runs of the graph (after a warm-up run), and,
    for large ops, the least time on a band of ``BAND_ROWS`` rows with the share of the output it makes."""
    interp = _TimedInterpreter(gm, device)
    with torch.no_grad():
        interp.run(*args)
        interp.times.clear()
        interp.bands.clear()
        for _ in range(repeats):
            interp.run(*args)
    return interp.times, interp.bands


# An op gets a rate of its own (``DeviceCosts.by_op``) when the calibration timed at least this many of its nodes.
OWN_RATE_NODES = 3


def fit_rates(samples: Iterable[tuple], op_s: float) -> tuple[dict[str, float], dict[str, float], dict, dict[str, float]]:
    """Each class's rate (FLOP/s) or bandwidth (bytes/s): its nodes' FLOPs or bytes over their time, less a
    dispatch each; and the same per op (:func:`passes.timing.op_key`) and size (:func:`passes.timing.size_class`:
    band timings count as small) for the ops timed often enough to weigh in their class. ``samples``: (graph,
    node times) or (graph, node times, band times) as :func:`node_times` returns them. Returns (flops_per_s,
    bytes_per_s, counts per class: nodes and seconds, rates by op)."""
    work: dict[tuple[str, str], float] = {}
    spent: dict[tuple[str, str], float] = {}
    count: dict[tuple[str, str], int] = {}
    for sample in samples:
        gm, times = sample[0], sample[1]
        bands = sample[2] if len(sample) > 2 else {}
        table = node_costs(gm)
        timed = [(n, t, 1.0, False) for n, t in times.items()]
        timed += [(n, t, share, True) for n, (t, share) in bands.items()]
        for n, t, share, band in timed:
            c = table.get(n)
            if c is None or c.kind not in COMPUTE + MEMORY:
                continue
            feature = share * (c.flops if c.kind in COMPUTE else c.nbytes)
            if feature <= 0:
                continue
            size = size_class(c.out_bytes * share)
            chain = key_chain(c.op)  # the op's key and its coarser ones (conv3d/c32/k27, conv3d/c32, conv3d)
            keys = ((c.kind, f"{c.kind}@{size}"), *((c.kind, f"{k}@{size}") for k in chain))
            if not band:  # the class's and the op's own rates are those of whole calls
                keys += ((c.kind, ""), *((c.kind, k) for k in chain))
            for key in dict.fromkeys(keys):
                work[key] = work.get(key, 0.0) + feature
                spent[key] = spent.get(key, 0.0) + max(t - op_s, t * 0.05)
                count[key] = count.get(key, 0) + 1
    rates = {k: work[(k, "")] / spent[(k, "")] for k, op in work if not op}
    flops = {k: rates.get(k, rates.get("matmul", 1e10)) for k in COMPUTE}
    membw = {k: rates.get(k, rates.get("pointwise", 1e9)) for k in MEMORY}
    by_op = {op: work[(k, op)] / spent[(k, op)] for k, op in work if op and count[(k, op)] >= OWN_RATE_NODES}
    counts = {k: {"nodes": count[(k, "")], "seconds": round(spent[(k, "")], 4)} for k, op in count if not op}
    return flops, membw, counts, by_op


def measure_costs(device: str | torch.device = "cpu", models: Iterable[str] = CALIBRATION_MODELS,
                  size: str = "medium", repeats: int = 2, progress: Callable[[str], None] | None = None
                  ) -> DeviceCosts:
    """A :class:`~passes.timing.DeviceCosts` table measured on ``device`` (see the module docstring)."""
    from fxstream.capture import capture, normalize_inputs
    from fxstream.models import build

    device = torch.device(device)
    say = progress or (lambda _m: None)
    say("dispatch costs")
    dispatch = dispatch_costs(device)
    samples = []
    for name in models:
        say(f"timing every node of {name} ({size})")
        b = build(name, size, device=device)
        gm = capture(b.module, *b.args, **b.kwargs)
        flat, _ = normalize_inputs(b.module, b.args, b.kwargs)
        samples.append((gm, *node_times(gm, tuple(flat), device, repeats)))
        del b
    flops, membw, counts, by_op = fit_rates(samples, dispatch["op_s"])
    kind = "cuda" if device.type == "cuda" else "cpu"
    name = torch.cuda.get_device_name(device) if kind == "cuda" else f"{platform.machine()} CPU"
    source = (f"measured by fxstream.timing.measure_costs on {name}, {torch.get_num_threads()} thread(s), "
              f"torch {torch.__version__}, models {', '.join(models)} ({size})")
    return DeviceCosts(kind, flops, membw, round(dispatch["op_s"], 9), round(dispatch["loop_s"], 9),
                       round(dispatch["call_s"], 9), source=source, measured=True,
                       details={"nodes": counts, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                       by_op=by_op)


__all__ = ["CALIBRATION_MODELS", "dispatch_costs", "fit_rates", "measure_costs", "node_times"]
