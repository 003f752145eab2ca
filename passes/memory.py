"""Activation-memory timeline of a captured graph: per-node live bytes, the peak, and what is live there.

Input: a GraphModule whose nodes carry ``meta["val"]`` (FakeTensor, meta tensor, or a list/tuple of them) and,
for the eager model and the per-block breakdown, ``meta["nn_module_stack"]``. The graph is never run.

Output: a :class:`MemoryTimeline`. Its bytes are activation bytes: storage created by the graph's nodes. Graph
inputs (placeholders) and weights (parameters, buffers, constants) are reported apart and never counted as
activations, nor is anything that aliases them.

The model, in the shape of ``torch/_inductor/memory.py``'s ``estimate_peak_memory``:

- Bytes are per storage. Views share their base's storage: values are grouped by the identity of their fake
  storage, and by a rule table of alias-producing ops for what fake storages do not show (``dropout`` in
  eval mode returns its input in eager, yet its fake value has a fresh storage: capture notes, pitfall 6).
- A storage is allocated by the first node producing it and freed after the last user of any of its aliases.
  While a node runs, its inputs and its outputs are live together, plus its workspace.
  Graph outputs stay alive to the end.
- ``lifetime="graph"`` frees at last use, as a compiled GraphModule does. ``lifetime="eager"`` models the
  Python frames of the original module instead: a value passed into a module call stays alive until the call
  returns, and a value assigned to a local variable until the name is reassigned or the function returns
  (read from the nodes' stack traces). Validated against ``fxstream.measure`` on the zoo's UNets and VAE
  decoders: graph lifetimes match the measured GraphModule exactly (CPU; and CUDA on an H200, full sizes
  included), eager lifetimes the eager module within 4% (CPU, tiny and medium; see ``tests/test_memory.py``).
- Workspace: transient bytes a node allocates besides its outputs: ``NodeInfo.workspace_bytes`` when a pass
  set it (an outlined sliced group), else SDPA's by backend and, on CUDA, cuDNN's convolution transposes.
"""

from __future__ import annotations

import ast
import functools
import linecache
import math
import operator
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal

import torch
import torch.fx

from passes import ops
from passes.meta import META_KEY, module_path, storage_key, upper_bound
from passes.ops import Alias

Lifetime = Literal["graph", "eager"]
Target = Literal["cpu", "cuda"]
SdpaBackend = Literal["flash", "efficient", "math"]

_LIFETIMES = ("graph", "eager")
_TARGETS = ("cpu", "cuda")
_SDPA_BACKENDS = ("flash", "efficient", "math")

# Label of nodes that belong to no submodule (ops in the root module's own forward).
TOP_LEVEL = "(top level)"

# Flash / memory-efficient kernels store one fp32 logsumexp per query row; efficient pads rows to 32.
_LOGSUMEXP_ITEMSIZE = 4
_EFFICIENT_ROW_ALIGN = 32


@dataclass
class LiveTensor:
    """One storage live at the peak: the node that produced it, where, and its size."""

    node: str
    module_path: str
    shape: list[int]
    dtype: str
    nbytes: int
    workspace: bool = False  # True for the transient workspace of the node running at the peak


@dataclass
class BlockPeak:
    """The highest activation bytes while a top-level block runs, and the node where it occurs."""

    block: str
    peak_bytes: int
    node: str


@dataclass
class MemoryTimeline:
    """Activation bytes over the graph's execution order.

    nodes / live_bytes: node names in execution order, and the activation bytes live while each node runs
        (its inputs, its outputs, everything held for later, and its workspace).
    activation_peak_bytes / peak_node / peak_module_path: the maximum of ``live_bytes`` and where it is.
    live_at_peak: the storages live at the peak, largest first (the largest ``top`` of them).
    blocks: per top-level block (``down_blocks.0``, ``mid_block``, ``conv_in``...), in execution order.
    weight_bytes / input_bytes / output_bytes: parameters, buffers and constants; graph inputs; graph outputs.
    lifetime / target / sdpa_backend: the options the timeline was computed with.
    """

    nodes: list[str]
    live_bytes: list[int]
    activation_peak_bytes: int
    peak_node: str
    peak_module_path: str
    live_at_peak: list[LiveTensor]
    blocks: list[BlockPeak]
    weight_bytes: int
    input_bytes: int
    output_bytes: int
    lifetime: str = "graph"
    target: str = "cpu"
    sdpa_backend: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryTimeline:
        data = dict(data)
        data["live_at_peak"] = [LiveTensor(**t) for t in data["live_at_peak"]]
        data["blocks"] = [BlockPeak(**b) for b in data["blocks"]]
        return cls(**data)

    @property
    def total_peak_bytes(self) -> int:
        """Weights + graph inputs + activation peak: the device memory the call needs."""
        return self.weight_bytes + self.input_bytes + self.activation_peak_bytes


@dataclass
class _Storage:
    """A group of values sharing one storage."""

    nbytes: int
    kind: str  # "activation", "input" or "weight"
    producer: torch.fx.Node
    value: torch.Tensor
    first: int
    last: int
    members: list[torch.fx.Node] = field(default_factory=list)


def analyze_memory(
    gm: torch.fx.GraphModule,
    *,
    lifetime: Lifetime = "graph",
    target: Target | None = None,
    sdpa_backend: SdpaBackend | None = None,
    top: int | None = 20,
) -> MemoryTimeline:
    """Predict the activation-memory timeline of ``gm`` from its nodes' fake values.

    Args:
        lifetime: ``"graph"`` frees each storage after its last use, as the GraphModule does when run;
            ``"eager"`` models running the original module, whose Python frames hold arguments and local
            variables longer (see ``_extend_for_eager``).
        target: the device the graph will run on, which decides the SDPA backend when ``sdpa_backend`` is
            None. None: the device of the graph's values, with meta (full-size planning) taken as ``"cuda"``.
        sdpa_backend: force the backend used for SDPA workspaces (see :func:`sdpa_workspace_bytes`).
        top: how many of the largest live storages to list in ``live_at_peak`` (None: all).

    Raises:
        ValueError: naming the bad argument.
    """
    check_options(lifetime=lifetime, target=target, sdpa_backend=sdpa_backend)
    if top is not None and top < 0:
        raise ValueError(f"top must be >= 0 or None, got {top}")
    nodes = list(gm.graph.nodes)
    if not nodes:
        raise ValueError("gm: the graph has no nodes")
    step = {node: i for i, node in enumerate(nodes)}
    target = target or _infer_target(nodes)
    storages = _group_storages(nodes, step)
    if lifetime == "eager":
        _extend_for_eager(nodes, step, storages)

    workspace = [upper_bound(_workspace_bytes(n, target, sdpa_backend)) for n in nodes]
    live_bytes = live_curve(((s.first, s.last, s.nbytes) for s in storages if s.kind == "activation"), workspace)

    peak = max(range(len(nodes)), key=live_bytes.__getitem__)
    peak_node = nodes[peak]
    live_at_peak = [
        LiveTensor(s.producer.name, module_path(s.producer), list(s.value.shape), _dtype_name(s.value.dtype),
                   s.nbytes)
        for s in storages
        if s.kind == "activation" and s.first <= peak <= s.last
    ]
    if workspace[peak]:
        live_at_peak.append(LiveTensor(peak_node.name, module_path(peak_node), [], "", workspace[peak],
                                       workspace=True))
    live_at_peak.sort(key=lambda t: t.nbytes, reverse=True)

    return MemoryTimeline(
        nodes=[n.name for n in nodes],
        live_bytes=live_bytes,
        activation_peak_bytes=live_bytes[peak],
        peak_node=peak_node.name,
        peak_module_path=module_path(peak_node),
        live_at_peak=live_at_peak if top is None else live_at_peak[:top],
        blocks=_block_peaks(nodes, live_bytes),
        weight_bytes=_weight_bytes(gm, nodes),
        input_bytes=sum(s.nbytes for s in storages if s.kind == "input"),
        output_bytes=_output_bytes(nodes, storages),
        lifetime=lifetime,
        target=target,
        sdpa_backend=sdpa_backend,
    )


def live_curve(spans: Iterable[tuple[int, int, int]], transient: list[int]) -> list[int]:
    """The liveness computation every memory prediction of fxstream goes through (graphs, sliced bodies,
    row programs): bytes live at each step, for storages live from step ``first`` to step ``last`` (both
    included: a step's inputs and outputs are live together), plus ``transient[i]`` bytes only while step
    ``i`` runs (a workspace)."""
    delta = [0] * (len(transient) + 1)
    for first, last, nbytes in spans:
        delta[first] += nbytes
        delta[last + 1] -= nbytes
    live, running = [], 0
    for i, extra in enumerate(transient):
        running += delta[i]
        live.append(running + extra)
    return live


def check_options(*, lifetime: str, target: str | None, sdpa_backend: str | None) -> None:
    """Raise ValueError naming the argument if an option of :func:`analyze_memory` is not a known value."""
    if lifetime not in _LIFETIMES:
        raise ValueError(f"lifetime must be one of {_LIFETIMES}, got {lifetime!r}")
    if target is not None and target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS} or None, got {target!r}")
    if sdpa_backend is not None and sdpa_backend not in _SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend must be one of {_SDPA_BACKENDS} or None, got {sdpa_backend!r}")


# ---------------------------------------------------------------------------------------------- storages


def tensor_values(val: Any) -> list[torch.Tensor]:
    """The tensors in a node's ``meta["val"]`` (a tensor, or a possibly nested list/tuple of them)."""
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in tensor_values(v)]
    return []


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of the storage behind ``t`` (its base's, for a view)."""
    try:
        return upper_bound(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. functional wrappers)
        return upper_bound(t.numel()) * t.element_size()


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _storage_union(nodes: list[torch.fx.Node]):
    """The nodes' tensor values, their storage keys, and the union of keys that share one storage."""
    values = {n: tensor_values(n.meta.get("val")) for n in nodes}
    keys = {n: _storage_keys(n, values[n]) for n in nodes}
    uf = _UnionFind()
    for n in nodes:
        for k in keys[n]:
            uf.find(k)
        for k, base in _alias_pairs(n, keys):
            uf.union(base, k)
    return values, keys, uf


_KEYS = "fxstream_storage_keys"


def _storage_keys(node: torch.fx.Node, values: list[torch.Tensor]) -> list[Any]:
    """The storage keys of the node's tensors, kept on the node beside the value they were read from (the planner
    builds a timeline hundreds of times per model)."""
    v = node.meta.get("val")
    kept = node.meta.get(_KEYS)
    if kept is None or kept[0] is not v:
        kept = node.meta[_KEYS] = (v, [storage_key(t) for t in values])
    return kept[1]


def storage_classes(nodes: list[torch.fx.Node]
                    ) -> tuple[dict[torch.fx.Node, list[Any]], dict[Any, list[torch.fx.Node]]]:
    """Which nodes share a storage, by the same rules the timeline counts bytes with: each node's storage
    classes (one per tensor it returns), and each class's nodes in graph order."""
    _, keys, uf = _storage_union(nodes)
    of = {n: [uf.find(k) for k in keys[n]] for n in nodes}
    members: dict[Any, list[torch.fx.Node]] = {}
    for n in nodes:
        for c in dict.fromkeys(of[n]):
            members.setdefault(c, []).append(n)
    return of, members


def _group_storages(nodes: list[torch.fx.Node], step: dict[torch.fx.Node, int]) -> list[_Storage]:
    """Group the nodes' values by shared storage and give each group its bytes, kind and live range."""
    values, keys, uf = _storage_union(nodes)

    groups: dict[Any, _Storage] = {}
    last_step = len(nodes) - 1
    for n in nodes:
        if n.op == "output":
            continue
        for i, (t, k) in enumerate(zip(values[n], keys[n])):
            last_use = _last_use(n, i if len(values[n]) > 1 else None, step)
            root = uf.find(k)
            kind = {"placeholder": "input", "get_attr": "weight"}.get(n.op, "activation")
            s = groups.get(root)
            if s is None:
                s = groups[root] = _Storage(storage_nbytes(t), kind, n, t, step[n], last_use)
            else:
                s.nbytes = max(s.nbytes, storage_nbytes(t))
                s.last = max(s.last, last_use)
                if kind != "activation" and s.kind != "weight":  # an alias of an input or weight is not new
                    s.kind = kind
            if not s.members or s.members[-1] is not n:
                s.members.append(n)
    for s in groups.values():
        if any(u.op == "output" for m in s.members for u in m.users):
            s.last = last_step
    return list(groups.values())


def _last_use(node: torch.fx.Node, index: int | None, step: dict[torch.fx.Node, int]) -> int:
    """Step of the last user of the node's value (of its element ``index`` when it returns several)."""
    users = node.users
    if index is not None and all(u.target is operator.getitem for u in users):
        users = [u for u in users if u.args[1] == index]
    return max((step[u] for u in users), default=step[node])


def _alias_pairs(node: torch.fx.Node, keys: dict[torch.fx.Node, list[Any]]) -> Iterable[tuple[Any, Any]]:
    """(output storage key, input storage key) for each output the op returns as an alias of its input.

    Fake storages already show most aliasing; this table covers graphs whose values were propagated apart and
    the ops where eager aliases but the fake value does not (eval-mode dropout).
    """
    if node.op != "call_function" or not keys[node]:
        return []
    if node.target is operator.getitem:
        source, index = node.args
        if isinstance(source, torch.fx.Node) and isinstance(index, int) and index < len(keys[source]):
            return [(keys[node][0], keys[source][index])]
        return []
    base = node.args[0] if node.args else None
    if not isinstance(base, torch.fx.Node) or not keys[base]:
        return []
    if returns_alias(node, base):
        return [(k, keys[base][0]) for k in keys[node]]
    return []


def returns_alias(node: torch.fx.Node, base: torch.fx.Node) -> bool:
    """Whether the op returns (a view of) its input ``base`` in eager, by the op table's ``alias``."""
    alias = ops.of(node).alias
    if alias in (Alias.VIEW, Alias.VIEWS):
        return True
    if alias is Alias.DROPOUT:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.0)
        train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True)
        return p == 0 or not train
    out, src = node.meta.get("val"), base.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(src, torch.Tensor):
        return False
    if alias is Alias.RESHAPE:
        return _is_viewable(src, out.shape)
    if alias is Alias.CONVERT:
        if node.kwargs.get("copy", False) or out.dtype != src.dtype or out.device != src.device:
            return False
        memory_format = node.kwargs.get("memory_format") or torch.contiguous_format
        return node.target is not ops.CONTIGUOUS or src.is_contiguous(memory_format=memory_format)
    return False


def _is_viewable(src: torch.Tensor, shape: torch.Size) -> bool:
    """Whether ``src.view(shape)`` works with src's strides (so that reshape returns a view)."""
    try:
        torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device="meta").view(shape)
    except RuntimeError:
        return False
    return True


# ------------------------------------------------------------------------------------- eager lifetimes


def _extend_for_eager(nodes: list[torch.fx.Node], step: dict[torch.fx.Node, int],
                      storages: list[_Storage]) -> None:
    """Lengthen lifetimes to what eager Python frames hold (``lifetime="eager"``).

    1. Arguments: a value passed into a module call (produced outside module M, used inside it) is held by
       the caller and by M's ``forward`` until the call returns.
    2. Local variables: a value assigned to a name in a function (``residual = ...``; the operands of
       ``out = (x + h) / s`` stay bound to ``h``) is held until the name is reassigned in the same call or
       the call returns. Assignments are read from each node's ``stack_trace`` and the source it names;
       nodes without a stack trace, or frames whose source cannot be read, fall back to rule 1 alone.
    """
    calls, ends = _module_calls(nodes)
    for s in storages:
        if s.kind != "activation":
            continue
        for member in s.members:
            produced_in = set(calls.get(member, ()))
            for user in member.users:
                for call in calls.get(user, ()):
                    if call not in produced_in:  # the outermost call the value enters: it ends last
                        s.last = max(s.last, ends[call])
                        break
    owners: dict[torch.fx.Node, list[_Storage]] = {}
    for s in storages:
        for m in s.members:
            owners.setdefault(m, []).append(s)
    for node, until in _local_variable_holds(nodes, step):
        for s in owners.get(node, ()):
            if s.kind == "activation":
                s.last = max(s.last, until)


def _module_calls(nodes: list[torch.fx.Node]) -> tuple[dict[torch.fx.Node, list[int]], list[int]]:
    """Each node's enclosing module calls (outermost first) and each call's last step.

    A call is a maximal run of consecutive nodes whose ``nn_module_stack`` holds the same module; nodes
    without a stack (placeholders, get_attr, output) neither extend nor break a run.
    """
    calls: dict[torch.fx.Node, list[int]] = {}
    ends: list[int] = []
    open_calls: dict[str, int] = {}
    for i, node in enumerate(nodes):
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        current = {}
        for key in stack:
            call = open_calls.get(key)
            if call is None:
                call = len(ends)
                ends.append(i)
            current[key] = call
            ends[call] = i
        open_calls = current
        calls[node] = list(current.values())
    return calls, ends


_TRACE_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>[^\n]+)')


@dataclass
class _Statement:
    """One execution of a Python statement inside one call of the function that contains it."""

    call: int
    targets: tuple[ast.expr, ...]
    nodes: list[torch.fx.Node] = field(default_factory=list)


def _statements(nodes: list[torch.fx.Node]) -> tuple[list[_Statement], list[int]]:
    """Statement executions (in order) and each function call's last step, from the nodes' stack traces.

    At every frame depth, a node continues the previous node's call when all outer frames are in the same
    statement executions and the frame is in the same function at the same or a later statement (a new
    call of the function from the same place, as in a loop over ``self.resnets``, starts over at an
    earlier line). The outermost frame, the root module's forward, is one call.
    """
    statements: list[_Statement] = []
    call_ends: list[int] = []
    prev_frames: list[tuple[str, str, int]] = []
    prev_statements: list[int] = []
    for i, node in enumerate(nodes):
        trace = node.meta.get("stack_trace")
        if not trace or node.op not in ("call_function", "call_module"):
            continue
        frames, current = [], []
        for d, m in enumerate(_TRACE_FRAME.finditer(trace)):
            stmt = _simple_statements(m["file"]).get(int(m["line"]))
            frame = (m["file"], m["func"], stmt.lineno if stmt is not None else int(m["line"]))
            same_call = (
                d < len(prev_frames)
                and current == prev_statements[:d]
                and prev_frames[d][:2] == frame[:2]
                and (d == 0 or prev_frames[d][2] <= frame[2])  # the root forward is called once
            )
            if same_call and prev_frames[d][2] == frame[2]:
                index = prev_statements[d]
            else:
                call = statements[prev_statements[d]].call if same_call else len(call_ends)
                if call == len(call_ends):
                    call_ends.append(i)
                index = len(statements)
                statements.append(_Statement(call, _assign_targets(stmt)))
            statements[index].nodes.append(node)
            call_ends[statements[index].call] = i
            frames.append(frame)
            current.append(index)
        prev_frames, prev_statements = frames, current
    return statements, call_ends


@functools.lru_cache(maxsize=None)
def _simple_statements(file: str) -> dict[int, ast.stmt]:
    """Each line of a source file mapped to the simple (not compound) statement that spans it."""
    try:
        tree = ast.parse("".join(linecache.getlines(file)))
    except (SyntaxError, ValueError):
        return {}
    index = {}
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.stmt) and not hasattr(stmt, "body"):
            for line in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1):
                index[line] = stmt
    return index


def _assign_targets(stmt: ast.stmt | None) -> tuple[ast.expr, ...]:
    if isinstance(stmt, ast.Assign):
        return tuple(stmt.targets)
    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        return (stmt.target,)
    return ()


def _local_variable_holds(nodes: list[torch.fx.Node],
                          step: dict[torch.fx.Node, int]) -> Iterable[tuple[torch.fx.Node, int]]:
    """(node, step): a local variable holds the node's value until that step (see ``_extend_for_eager``)."""
    statements, call_ends = _statements(nodes)
    bound: dict[tuple[int, str], torch.fx.Node] = {}
    for st in statements:
        for name, value in _assigned_values(st):
            previous = bound.get((st.call, name))
            if previous is not None:  # rebinding happens when the new value is complete
                yield previous, step[st.nodes[-1]]
            bound[(st.call, name)] = value
    for (call, _), value in bound.items():
        yield value, call_ends[call]


def _assigned_values(st: _Statement) -> list[tuple[str, torch.fx.Node]]:
    """(name, node) for each local name the statement binds to a tensor the graph computes."""
    produced = [n for n in st.nodes if tensor_values(n.meta.get("val"))]
    if not produced:
        return []
    pairs = []
    for target in st.targets:
        if isinstance(target, ast.Name):
            pairs.append((target.id, produced[-1]))  # the statement's last value is what it assigns
        elif isinstance(target, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Name) for e in target.elts):
            # ``a, b = x.chunk(2)``: bound only when the statement ends with that unpacking's getitems.
            items = produced[-len(target.elts):]
            if (len(items) == len(target.elts) and all(n.target is operator.getitem for n in items)
                    and len({n.args[0] for n in items}) == 1):
                pairs.extend((e.id, n) for e, n in zip(target.elts, items))
    return pairs


# -------------------------------------------------------------------------------------------- workspace


def _workspace_bytes(node: torch.fx.Node, target: str, sdpa_backend: str | None) -> int:
    info = node.meta.get(META_KEY)
    if info is not None and info.workspace_bytes is not None:
        return info.workspace_bytes
    family = ops.of(node).family
    if family == "sdpa":
        return sdpa_workspace_bytes(node, sdpa_backend or sdpa_backend_for(node, target))
    if family == "keys":  # passes/keys.py: the chain on one chunk of keys, the accumulators
        return node.target.workspace_bytes(_val(node.args[0]))
    if family == "conv" and target == "cuda":
        return cuda_conv_workspace_bytes(node)
    return 0


def cuda_conv_workspace_bytes(node: torch.fx.Node) -> int:
    """Transient bytes of a convolution on CUDA: ``input + output`` for a kernel wider than 1x1, else 0.

    cuDNN 9 runs channels-first convolutions through channels-last kernels, transposing the input in and the
    output back inside its workspace. Measured per op with ``torch.cuda.max_memory_allocated`` on an H200
    (fp16 and fp32, 64-512 channels, 64-512 pixels square, the SVD/SD VAE decoders and the SVD UNet): within
    a few percent of ``input + output`` for every 3x3 and 3x1x1 convolution with a channels-first input;
    1x1 convolutions need none. An input that is already channels-last needs no transposes, but the fake
    strides do not tell CUDA's layouts reliably (CPU GroupNorm keeps channels-last, CUDA's does not), so
    every such convolution is charged: an over-estimate where CUDA really runs channels-last (the VAE
    decoders' upsampler convolutions). On the CPU, oneDNN's reorders are not tensors and are counted by
    neither the estimator nor ``fxstream.measure``.
    """
    x, weight = _val(node.args[0]), _val(node.args[1])
    if math.prod(weight.shape[2:]) == 1:
        return 0
    return storage_nbytes(x) + storage_nbytes(_val(node))


def sdpa_backend_for(node: torch.fx.Node, target: str) -> str:
    """The SDPA kernel PyTorch picks for this node on ``target``.

    CPU: flash attention (any float dtype, with or without a mask) when q, k, v are 4-D with one head size,
    a unit last stride, and no dropout; else the math path (e.g. 3-D inputs, or a value head size that
    differs from the query's). CUDA: flash for fp16/bf16, memory-efficient otherwise.
    """
    q, k, v = (_val(a) for a in node.args[:3])
    if target == "cuda":
        return "flash" if q.dtype in (torch.float16, torch.bfloat16) else "efficient"
    dropout_p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
    flash_ok = (
        all(t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v))
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
        and dropout_p == 0
    )
    return "flash" if flash_ok else "math"


def sdpa_workspace_bytes(node: torch.fx.Node, backend: str) -> int:
    """Transient bytes SDPA allocates besides its output, for q (..., Lq, E) and k (..., Lk, E).

    - flash: the fp32 logsumexp, ``B*H*Lq*4`` (B*H: q's leading dims). CPU flash's per-thread blocks are a
      few KiB and not counted.
    - efficient: the same with Lq rounded up to a multiple of 32.
    - math: with ``S = B*H*Lq*Lk*itemsize`` (the attention matrix) and ``Q`` the scaled query copy that lives
      through the call, the call peaks at ``Q + 2*S`` (matrix and softmax) or ``Q + S + out`` (softmax and
      output); the output is the node's own value, so the workspace is ``Q + S + max(S - out, 0)``.
    """
    q, k = _val(node.args[0]), _val(node.args[1])
    batch_heads, lq, lk = math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2]
    if backend == "flash":
        return batch_heads * lq * _LOGSUMEXP_ITEMSIZE
    if backend == "efficient":
        return batch_heads * (-(-lq // _EFFICIENT_ROW_ALIGN) * _EFFICIENT_ROW_ALIGN) * _LOGSUMEXP_ITEMSIZE
    if backend == "math":
        itemsize = q.element_size()
        scores, query = batch_heads * lq * lk * itemsize, q.numel() * itemsize
        out = storage_nbytes(_val(node))
        return query + scores + max(scores - out, 0)
    raise ValueError(f"sdpa_backend must be one of {_SDPA_BACKENDS}, got {backend!r}")


def _val(arg: Any) -> torch.Tensor:
    return arg.meta["val"] if isinstance(arg, torch.fx.Node) else arg


def _infer_target(nodes: list[torch.fx.Node]) -> str:
    for n in nodes:
        for t in tensor_values(n.meta.get("val")):
            return "cpu" if t.device.type == "cpu" else "cuda"
    return "cpu"


# ------------------------------------------------------------------------------- module paths and blocks


def _block_of(path: str, prefix: str) -> str:
    """The top-level block a module path is in: ``up_blocks.1`` (a ModuleList entry), ``mid_block``..."""
    if prefix:
        path = path[len(prefix) + 1:] if path.startswith(prefix + ".") else ""
    if not path:
        return TOP_LEVEL
    parts = path.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def _common_wrapper(paths: list[str]) -> str:
    """The module every op lies in (``decoder`` for a VAE's decode), so that blocks are named below it."""
    prefix = ""
    while paths and all(paths):
        heads = {p.split(".")[0] for p in paths}
        if len(heads) != 1:
            break
        head = heads.pop()
        if any(p.split(".")[1:2] and p.split(".")[1].isdigit() for p in paths):
            break  # a ModuleList: its entries are the blocks
        prefix = f"{prefix}.{head}" if prefix else head
        paths = [p[len(head) + 1:] for p in paths]
    return prefix


def _block_peaks(nodes: list[torch.fx.Node], live_bytes: list[int]) -> list[BlockPeak]:
    paths = {n: module_path(n) for n in nodes if n.op in ("call_function", "call_module", "call_method")}
    prefix = _common_wrapper(list(paths.values()))
    peaks: dict[str, BlockPeak] = {}
    for i, n in enumerate(nodes):
        if n not in paths:
            continue
        block = _block_of(paths[n], prefix)
        current = peaks.get(block)
        if current is None or live_bytes[i] > current.peak_bytes:
            peaks[block] = BlockPeak(block, live_bytes[i], n.name)
    return list(peaks.values())


# ------------------------------------------------------------------------------------ weights, outputs


def _weight_bytes(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> int:
    """Parameters, buffers and tensor constants (what get_attr nodes read), each storage once."""
    tensors = [t for _, t in gm.named_parameters()] + [t for _, t in gm.named_buffers()]
    for n in nodes:
        if n.op == "get_attr":
            attr = _get_attr(gm, n.target)
            if isinstance(attr, torch.Tensor):
                tensors.append(attr)
    seen: dict[Any, int] = {}
    for t in tensors:
        seen.setdefault(storage_key(t), storage_nbytes(t))
    return sum(seen.values())


def _get_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _output_bytes(nodes: list[torch.fx.Node], storages: list[_Storage]) -> int:
    outputs = {m for n in nodes if n.op == "output" for m in n.all_input_nodes}
    return sum(s.nbytes for s in storages if outputs.intersection(s.members))


# ---------------------------------------------------------------------------------------------- report


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_report(timeline: MemoryTimeline, top: int = 10) -> str:
    """A plain-text report: totals, where the activation peak is, what is live there, and per-block peaks."""
    from tabulate import tabulate  # only the report needs it; the pass itself imports torch and stdlib only

    t = timeline
    summary = tabulate(
        [
            ["weights", format_bytes(t.weight_bytes), ""],
            ["graph inputs", format_bytes(t.input_bytes), ""],
            ["activation peak", format_bytes(t.activation_peak_bytes),
             f"at {t.peak_node} ({t.peak_module_path or TOP_LEVEL})"],
            ["graph outputs", format_bytes(t.output_bytes), "(included in activations)"],
            ["total at peak", format_bytes(t.total_peak_bytes), "weights + inputs + activation peak"],
        ],
        headers=["memory", "bytes", "where"],
    )
    live = tabulate(
        [
            [x.node + (" (workspace)" if x.workspace else ""), x.module_path or TOP_LEVEL,
             "x".join(map(str, x.shape)) or "-", x.dtype or "-", format_bytes(x.nbytes)]
            for x in t.live_at_peak[:top]
        ],
        headers=["live at peak", "module", "shape", "dtype", "bytes"],
    )
    blocks = tabulate(
        [[b.block, format_bytes(b.peak_bytes), b.node] for b in t.blocks],
        headers=["block", "activation peak", "at node"],
    )
    header = f"memory timeline (lifetime={t.lifetime}, target={t.target}, sdpa={t.sdpa_backend or 'auto'})"
    return "\n\n".join([header, summary, live, blocks])
