"""Time: the one cost engine. FLOPs and bytes of each node, and the seconds a graph, a sliced group or a
row-streamed segment takes on a device, from a small table of op costs measured on that device kind.

The model: a node costs its dispatch (``op_s``: one op of a generated graph; ``loop_s``: one op run inside a slice
loop or a band program, whose Python loop adds to the dispatch) plus its work, by its class:

* ``conv``, ``matmul``, ``attention``: FLOPs (torch's own formulas, ``torch.utils.flop_counter``) over the
  class's rate;
* ``norm``, ``copy``, ``pointwise``: the bytes it reads and writes over the class's bandwidth;
* ``view``: nothing but the dispatch (the memory engine's alias rule, :func:`passes.memory.returns_alias`).

A :class:`DeviceCosts` table holds the rates, bandwidths and dispatch costs of one device kind; the shipped ones
live next to this file (``costs_<kind>.json``) and say how they were obtained. ``fxstream.timing.measure_costs``
measures a new one on the machine at hand (``python benchmarks/device_costs.py`` regenerates the shipped CPU
table). Times are predictions: ``benchmarks/cpu.py`` sets them beside measured calls.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.utils.flop_counter import FlopCounterMode

from passes import ops
from passes.memory import returns_alias, tensor_values
from passes.meta import tensor_bytes, upper_bound

COMPUTE = ("conv", "matmul", "attention")
MEMORY = ("norm", "copy", "pointwise")
CLASSES = COMPUTE + MEMORY + ("view",)
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class DeviceCosts:
    """What ops cost on one device kind: ``flops_per_s`` per compute class, ``bytes_per_s`` per memory class,
    ``op_s`` per op of a graph, ``loop_s`` per op of a slice body or band program, ``call_s`` per slice or band
    (the loop's own step: narrowing inputs, calling the body, writing its outputs). ``source`` says where the
    numbers come from (a measurement's command and machine, or a datasheet)."""

    kind: str
    flops_per_s: dict[str, float]
    bytes_per_s: dict[str, float]
    op_s: float
    loop_s: float
    call_s: float
    source: str = ""
    measured: bool = False
    details: dict = field(default_factory=dict, compare=False)
    # rates of single ops (:func:`op_key`: ``conv3d``, an ATen overload's name) where the measurement had enough of
    # them, FLOP/s for compute classes and bytes/s for memory classes; the class's rate for any other op
    by_op: dict[str, float] = field(default_factory=dict)

    def work_seconds(self, kind: str, flops: float, nbytes: float, op: str = "", out_bytes: float = 0) -> float:
        """Seconds of an op's work (without its dispatch) that writes ``out_bytes``: the rate of the op at its
        :func:`size_class`, else of its coarser keys (:func:`key_chain`: ``conv3d/c32``, ``conv3d``) at that
        size, else of the op and its coarser keys at any size, of its class at that size, of its class."""
        size = size_class(out_bytes)
        chain = key_chain(op)
        rate = None
        for key in (*(f"{k}@{size}" for k in chain), *chain, f"{kind}@{size}"):
            rate = self.by_op.get(key)
            if rate:
                break
        if kind in COMPUTE:
            return flops / (rate or self.flops_per_s[kind])
        if kind in MEMORY:
            return nbytes / (rate or self.bytes_per_s[kind])
        return 0.0

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(asdict(self), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> DeviceCosts:
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        return cls(**json.loads(p.read_text() if p is not None else str(text_or_path)))


# Ops whose output is at most this many bytes run out of the caches and are measured apart (``@S``; larger ones
# ``@L``): the same kernel on a band of rows runs two to four times faster per FLOP or byte than on a whole video
# once its operands fit the last-level cache (on this project's CPU, 32 MiB: measured on 3x3 and 3x1x1
# convolutions and SiLU, the time per element halves between 32 and 16 MiB outputs).
SMALL_BYTES = 16 * 2**20


def size_class(out_bytes: float) -> str:
    return "S" if out_bytes <= SMALL_BYTES else "L"


_LOADED: dict[str, DeviceCosts] = {}


def costs_for(target: str | None) -> DeviceCosts:
    """The shipped table for a target (``"cpu"``, ``"cuda"``, ``"cuda:1"``...); the CPU one for anything else."""
    kind = "cuda" if str(target or "cpu").startswith("cuda") else "cpu"
    if kind not in _LOADED:
        _LOADED[kind] = DeviceCosts.from_json(_HERE / f"costs_{kind}.json")
    return _LOADED[kind]


def use_costs(costs: DeviceCosts) -> None:
    """Plan with ``costs`` for its device kind from now on (a table measured on this machine)."""
    _LOADED[costs.kind] = costs


# ------------------------------------------------------------------------------------------------------------
# what one node does: its class, FLOPs and bytes


def op_class(node: torch.fx.Node) -> str | None:
    """The node's cost class (see the module docstring), or None for what costs nothing at run time (graph inputs,
    attributes, a tuple's item)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return None
    info = ops.of(node)
    if info.family == "conv":
        return "conv"
    if info.family in ("sdpa", "keys"):
        return "attention"
    if info.anchor:
        return "matmul"
    if info.family in ("group_norm", "norm") or node.target in (ops.PARTIAL, ops.APPLY):
        return "norm"
    x = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if info.alias is not ops.Alias.NONE and x is not None and returns_alias(node, x):
        return "view"
    if not isinstance(node.meta.get("val"), torch.Tensor) and not isinstance(node.meta.get("val"), (list, tuple)):
        return "view"  # a Python scalar or a size: no kernel
    if info.family in ("join", "pad") or node.target in (ops.CLONE, ops.COPY, ops.TO_COPY, ops.CONTIGUOUS) \
            or info.copies_storage or info.alias is not ops.Alias.NONE:
        return "copy"
    return "pointwise"


def node_flops(node: torch.fx.Node) -> int:
    """FLOPs of one node: the node is run on its fake values under ``torch.utils.flop_counter``'s
    FlopCounterMode, so composite ops (``conv2d``, ``linear``, SDPA) are counted by torch's own formulas after
    they decompose. Ops torch does not count (elementwise, normalisation) are 0, as in torch's counter."""
    if node.op != "call_function" or node.target is operator.getitem:
        return 0
    if ops.of(node).family == "sdpa":
        # torch's counter knows the flash / memory-efficient kernels, not the math or CPU ones a fake SDPA on
        # CPU dispatches to: its formula here, q @ k^T and p @ v
        q, k, v = (a.meta.get("val") for a in node.args[:3])
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            return 0
        qs, ks, vs = (_sizes(t) for t in (q, k, v))  # a data-dependent size (Mochi's) at its largest
        return 2 * math.prod(qs[:-2]) * qs[-2] * ks[-2] * (qs[-1] + vs[-1])
    if ops.of(node).family == "keys":  # the attention over every key; its chain's work is recomputed()'s
        q, op = _sizes(node.args[0].meta.get("val")), node.target
        return 2 * math.prod(q[:-2]) * q[-2] * op.key_length * (q[-1] + op.value_dim)

    def val(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, torch.fx.Node) else a

    args = torch.fx.node.map_aggregate(node.args, val)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, val)
    key = _flop_key(node.target, args, kwargs)
    if key is not None and key in _FLOPS:
        return _FLOPS[key]
    fake_mode = detect_fake_mode(tensor_values(list(args) + list(kwargs.values())))
    try:
        with contextlib.ExitStack() as stack:
            if fake_mode is not None:
                stack.enter_context(fake_mode)
            counter = stack.enter_context(FlopCounterMode(display=False))
            node.target(*args, **kwargs)
        flops = int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - an op that cannot run on its fake values: not counted
        flops = 0
    if key is not None and len(_FLOPS) < 100_000:
        _FLOPS[key] = flops
    return flops


def _sizes(t: torch.Tensor) -> list[int]:
    return [upper_bound(n) for n in t.shape]


# FLOPs by op and argument shapes: the blocks of a model repeat the same ops on the same shapes, and a plan counts
# the captured graph and its rewritten copies
_FLOPS: dict[tuple, int] = {}


def _flop_key(target: Any, args: Any, kwargs: Any) -> tuple | None:
    """The op and its arguments with each tensor as its shape and dtype, or None when an argument is not plain."""
    parts: list = []

    def put(a: Any) -> bool:
        if isinstance(a, torch.Tensor):
            parts.append(("T", tuple(a.shape), a.dtype))
        elif isinstance(a, (list, tuple)):
            parts.append(len(a))
            return all(put(b) for b in a)
        elif a is None or isinstance(a, (bool, int, float, str, torch.dtype)):
            parts.append(a)
        else:
            return False
        return True

    if not put(list(args)) or not put(sorted(kwargs.items(), key=lambda kv: kv[0])):
        return None
    key = (target, *parts)
    try:
        hash(key)
    except TypeError:  # a symbolic size (a data-dependent shape)
        return None
    return key


def flops_by_node(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int]:
    """:func:`node_flops` of every node with a count (computed once per graph, kept in ``gm.meta``)."""
    cached = gm.meta.get("fxstream_flops") if hasattr(gm, "meta") else None
    if cached is not None and cached[0] == len(gm.graph.nodes):
        return cached[1]
    counts = {}
    for n in gm.graph.nodes:
        if op_class(n) in COMPUTE:
            f = node_flops(n)
            if f:
                counts[n] = f
    if hasattr(gm, "meta"):
        gm.meta["fxstream_flops"] = (len(gm.graph.nodes), counts)
    return counts


def graph_flops(gm: torch.fx.GraphModule, nodes: set[torch.fx.Node] | None = None) -> int:
    """Total FLOPs of ``gm``'s nodes (of ``nodes`` only, when given)."""
    counts = flops_by_node(gm)
    return sum(f for n, f in counts.items() if nodes is None or n in nodes)


def node_bytes(node: torch.fx.Node) -> int:
    """Bytes a node reads and writes: its output and its tensor inputs (weights included)."""
    moved = tensor_bytes(node.meta.get("val"))
    for p in node.all_input_nodes:
        moved += tensor_bytes(p.meta.get("val"))
    return moved


def op_key(node: torch.fx.Node) -> str:
    """The name a cost table's per-op rates use: for a convolution ``conv<N>d/c<C>/k<K>``, N by the weight's dims
    (a temporal ``(3, 1, 1)`` kernel is a 3-D convolution, and runs as one), C the fewer of its input (per group)
    and output channels to the nearest power of two (kernels on few channels reach a fraction of the rate of wide
    ones) and K the kernel's taps (a 3x3x3 kernel runs at several times the FLOP rate of a 3x1x1 one on as many
    channels: HunyuanVideo's decode, timed on a table fitted on 3x1x1 ones, was predicted at 6x its time); else
    the ATen overload. A table without the key falls back along :func:`key_chain`, then to the class."""
    if ops.of(node).family == "conv":
        w = node.args[1].meta.get("val") if isinstance(node.args[1], torch.fx.Node) else None
        if isinstance(w, torch.Tensor):
            channels = max(1, min(w.shape[0], w.shape[1]))
            return f"conv{w.dim() - 2}d/c{2 ** round(math.log2(channels))}/k{math.prod(w.shape[2:])}"
    return str(node.target)


def key_chain(op: str) -> tuple[str, ...]:
    """``op`` and its coarser keys, finest first: ``conv3d/c32/k27``, ``conv3d/c32``, ``conv3d``."""
    parts = op.split("/")
    return tuple("/".join(parts[:i]) for i in range(len(parts), 0, -1)) if op else ()


@dataclass(frozen=True)
class NodeCost:
    """One node's class, FLOPs and bytes (its whole value), and its :func:`op_key`."""

    kind: str
    flops: int
    nbytes: int
    op: str = ""
    out_bytes: int = 0

    def work(self, costs: DeviceCosts, piece: float = 1.0) -> float:
        """Seconds of the whole value's work, computed ``piece`` of it at a time (a slice's, a band's share)."""
        return costs.work_seconds(self.kind, self.flops, self.nbytes, self.op, self.out_bytes * piece)


def node_costs(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, NodeCost]:
    """:class:`NodeCost` of every node that runs, computed once per graph (kept in ``gm.meta``)."""
    cached = gm.meta.get("fxstream_costs") if hasattr(gm, "meta") else None
    if cached is not None and cached[0] == len(gm.graph.nodes):
        return cached[1]
    flops = flops_by_node(gm)
    out = {}
    for n in gm.graph.nodes:
        kind = op_class(n)
        if kind is not None:
            out[n] = NodeCost(kind, flops.get(n, 0), node_bytes(n) if kind in MEMORY else 0, op_key(n),
                              tensor_bytes(n.meta.get("val")))
    if hasattr(gm, "meta"):
        gm.meta["fxstream_costs"] = (len(gm.graph.nodes), out)
    return out


def recomputed(node: torch.fx.Node, calls: int = 1) -> tuple[list[NodeCost], int]:
    """What a node recomputes besides its own work when it runs ``calls`` times: a key-chunked attention
    (:mod:`passes.keys`) runs its keys' and values' chain over every key on each call (its costs, and one dispatch
    per chain op and chunk); nothing for any other node."""
    if node.op != "call_function" or ops.of(node).family != "keys":
        return [], 0
    op = node.target
    return list(op.cone_costs) * calls, op.cone_nodes * op.chunks * calls


@dataclass
class LoopCost:
    """What an outlined loop runs in one call, in device-independent counts: ``work`` (each node's cost once per
    time it computes its whole value: a pass that recomputes a node counts it again), ``ops`` (op dispatches of
    generated code: a slice body's), ``instructions`` (ops a band program interprets), ``steps`` (body calls of
    a slice loop, over every pass) and ``copy_bytes`` (rows carried between bands, joined, copied into
    outputs)."""

    work: list[NodeCost] = field(default_factory=list)
    ops: int = 0
    instructions: int = 0
    steps: int = 0
    copy_bytes: int = 0
    piece: float = 1.0  # the share of a node's value one slice or band computes (the size its kernels run at)

    def seconds(self, costs: DeviceCosts) -> float:
        return sum(self.breakdown(costs).values())

    def breakdown(self, costs: DeviceCosts) -> dict[str, float]:
        """Seconds by what they pay for: work by class, dispatch, loop steps, copies."""
        out: dict[str, float] = {}
        for w in self.work:
            out[w.kind] = out.get(w.kind, 0.0) + w.work(costs, self.piece)
        out["dispatch"] = self.ops * costs.op_s + self.instructions * costs.loop_s + self.steps * costs.call_s
        out["copy"] = out.get("copy", 0.0) + self.copy_bytes / costs.bytes_per_s["copy"]
        return out


# ------------------------------------------------------------------------------------------------------------
# a graph's seconds


def graph_breakdown(gm: torch.fx.GraphModule, costs: DeviceCosts) -> dict[str, float]:
    """Predicted seconds of one call of ``gm`` by what they pay for (:meth:`LoopCost.breakdown`): each node's
    dispatch and work; an outlined loop (a ``call_module``) what its planner recorded (``NodeInfo.loop``)."""
    from passes.meta import node_info

    out: dict[str, float] = {}
    table = node_costs(gm)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            loop = node_info(n).loop
            parts = loop.breakdown(costs) if isinstance(loop, LoopCost) else {}
            parts["dispatch"] = parts.get("dispatch", 0.0) + costs.op_s
        elif n in table:
            c = table[n]
            parts = {c.kind: c.work(costs), "dispatch": costs.op_s}
            extra, dispatches = recomputed(n)
            for w in extra:
                parts[w.kind] = parts.get(w.kind, 0.0) + w.work(costs)
            parts["dispatch"] += dispatches * costs.loop_s
        else:
            continue
        for k, v in parts.items():
            out[k] = out.get(k, 0.0) + v
    return out


def graph_seconds(gm: torch.fx.GraphModule, costs: DeviceCosts) -> float:
    """Predicted seconds of one call of ``gm`` (see :func:`graph_breakdown`)."""
    return sum(graph_breakdown(gm, costs).values())


__all__ = ["CLASSES", "DeviceCosts", "LoopCost", "NodeCost", "costs_for", "flops_by_node", "key_chain", "graph_breakdown",
           "graph_flops", "graph_seconds", "node_bytes", "recomputed", "node_costs", "node_flops", "op_class", "op_key", "size_class", "use_costs"]
