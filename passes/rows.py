"""Row streaming: run the tail of a decoder band of rows by band of rows, with halos, exactly.

Where a group sliced along frames meets one sliced along pixels, the tensor between them exists at full size;
in a video VAE decoder's last blocks those tensors are the peak (see ARCHITECTURE.md). Row streaming gives
spatial and temporal layers one axis: the rows. A *segment* reads one full-size tensor (its input, at low
resolution) and writes one (its output); every node between runs on a band of its rows:

* a convolution along the rows needs ``(k - 1) / 2`` extra rows (the halo) each side of its band, and zero
  rows where the band touches the image edge (its own padding); the rows above come from the previous band.
  An explicit ``F.pad`` before a padding-0 convolution (the causal 3D convolutions of Wan, HunyuanVideo,
  Mochi, CogVideoX: ``(1, 1, 1, 1, 2, 0)``, zeros or ``replicate``) is folded into that halo: the pad node
  keeps the input's rows and pads only its other dims, and the convolution adds the row dim's padding at the
  image edge, zero rows or copies of the edge row (:func:`folded_pad`);
* a nearest upsampling by ``f`` maps output rows ``[a, b)`` to input rows ``[a // f, ceil(b / f))``;
* a GroupNorm whose statistics span the rows (per frame over C/G x H x W, or over C/G x T x H x W in a
  temporal ResBlock) is exact only with statistics of the whole tensor: the segment runs in *passes*. Pass
  ``j`` computes, band by band, the statistics of the GroupNorms at depth ``j`` (each band contributes the rows
  it computed first, so every row counts once; :func:`passes.reductions.combine_partials` merges them exactly)
  and the last pass computes the output with every statistic complete. A pass recomputes what it needs from
  the segment's input.

Bands run top to bottom and each computes only the rows of each node that no earlier band computed
(line-buffered streaming): the rows above a band that a convolution reads are kept from the previous band, a
few rows per convolution input, so no convolution's halo is recomputed. A chain of memory-bound ops into a
convolution (norm, SiLU, pad, upsampling) may instead be recomputed over those rows from the value it starts
at, which is kept anyway (:func:`rematerialized`), where that lowers the workspace. The passes do cost
recomputation (pass ``j`` recomputes from the segment's input what its statistics need); in exchange no tensor
between the segment's input and output ever exists at full size. Bands may be finer than a row of the segment's
lowest resolution (a latent row under 2, 4 or 8 bands of output rows): a band owns the low-resolution rows it
starts, and one that computes none passes on the rows above that the next bands read. Most bands of a pass
repeat the band a period above, shifted down: their programs are that band's, on other slots and rows.
Segments are chained at cut points (tensors every later node reaches only through them), each a full-size
tensor the next segment reads.

Input: a captured GraphModule. Output: :class:`RowSegment` s, their programs for
:class:`fxstream.runtime.rows.RowStream`, the predicted workspace and cost, and :func:`outline` to put them
into the graph as ``call_module`` nodes. The planner (:func:`choose_tail`, called by ``fxstream.module``) picks
where the streamed tail starts, where it is cut, and how many bands each segment gets.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F

from fxstream.runtime.rows import Band, Ext, RowStream, Stats, conv_rows, group_norm_rows
from fxstream.runtime.sliced import slice_bounds
from passes import ops
from passes.dims import (WHOLE, SliceAxis, SplitReduction, arg, input_axes, pointwise, shape, sliced_args, val,
                         view_groups)
from passes.memory import live_curve, returns_alias
from passes.meta import aliases_input, module_path, node_info, tensor_bytes
from passes.ops import conv_params
from passes.timing import DeviceCosts, LoopCost, NodeCost, costs_for, node_costs, op_class

# Bands per segment the planner tries (capped at the segment's rows, which are tried too up to the last step:
# one latent row per band, HunyuanVideo's 90 at 720p).
BAND_LADDER = (2, 4, 8, 16, 32, 64, 128)
# The planner stops adding bands to a segment once a step of the ladder saves less than this fraction; past
# one band per row of the coarsest nodes, less than ``FINER_GAIN`` (each finer step doubles the band programs
# and their host-side instructions for a few rows of halo saved: the tiny SVD decoder's tail, 32 -> 64 -> 128
# bands, saves 3.6% and 1.8%).
LADDER_GAIN = 0.01
FINER_GAIN = 0.10
# A segment with more passes than this is not considered where cut points could split it: pass p recomputes
# passes 0..p-1.
MAX_PASSES = 24
# A segment runs at most this many band programs (passes x bands; each is interpreted on the host, its
# instructions dispatched one by one): finer bands are not tried past it (CogVideoX's 38 passes stop at its
# latent's 60 rows, 1.01 GiB at full size; 240 bands would save a tenth of that for 4x the instructions).
MAX_BAND_PROGRAMS = 4096
# Bands finer than a row of the segment's coarsest nodes split each of its rows into at most this many (a decoder
# upsamples 8x: a latent row under 8 bands of one output row).
MAX_SPLIT = 8
# A memory-bound node may be recomputed over the rows above a band (not kept) when keeping what it is recomputed
# from costs at most this many times its own bytes (:func:`rematerialized`): a quarter over admits a per-position
# statistic broadcast beside the input (an RMS norm's divisor), and nothing that would keep twice what it saves.
REMAT_GROWTH = 1.25


@dataclass(frozen=True)
class RowReq:
    """How an op reads one input when its output is banded along the rows: the input's row dim, and
    ``same`` rows, a ``conv`` halo (kernel ``k``, ``pad`` rows before the first; ``k - 1 - pad`` after the last;
    ``mode`` zeros or replicate) or ``up`` (nearest upsampling by ``factor``)."""

    dim: int
    kind: str = "same"
    k: int = 1
    pad: int = 0
    factor: int = 1
    mode: str = "zeros"

    def needed(self, lo: int, hi: int, rows_in: int) -> tuple[int, int, int, int]:
        """Input rows ``[a, b)`` for output rows ``[lo, hi)`` (within the input), and the zero rows to add
        before and after them (a convolution's own padding, at the image edge)."""
        if self.kind == "conv":
            a, b = lo - self.pad, hi - self.pad + self.k - 1
            return max(a, 0), min(b, rows_in), max(0, -a), max(0, b - rows_in)
        if self.kind == "up":
            return lo // self.factor, -(-hi // self.factor), 0, 0
        return lo, hi, 0, 0


def _pads(node: torch.fx.Node) -> tuple[list[int], str] | None:
    """A pad node's ``F.pad`` spec and mode (``zeros`` for a constant 0, ``replicate``), or None."""
    if ops.of(node).family != "pad":
        return None
    if node.target is ops.PAD:
        mode, value = arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
    else:
        mode, value = "constant", arg(node, 2, "value", 0)
    if mode == "constant" and not value:
        return list(node.args[1]), "zeros"
    if mode == "replicate":
        return list(node.args[1]), "replicate"
    return None


def _dim_pads(pads: list[int], ndim: int, d: int) -> tuple[int, int]:
    i = 2 * (ndim - 1 - d)
    return (pads[i], pads[i + 1]) if i + 1 < len(pads) else (0, 0)


def folded_pad(node: torch.fx.Node, d: int) -> tuple[int, int, str] | None:
    """``(before, after, mode)`` when ``node`` holds rows padded along ``d`` for convolutions only, which then
    read the rows they need as a halo: a pad node, or a slice or join of such along another dim (the causal
    convolutions of CogVideoX and Mochi cut their padded input into overlapping chunks of frames at full size),
    every user a stride-1, undilated convolution with padding 0 along ``d`` and a kernel of
    ``before + after + 1`` there, or another such slice or join. None otherwise (the pad then changes the rows,
    and no band passes)."""
    if d < 2 or node.op != "call_function":
        return None
    info = _pad_origin(node, d)
    return info if info is not None and _read_by_convolutions(node, d, info) else None


def _pad_origin(node: torch.fx.Node, d: int) -> tuple[int, int, str] | None:
    """The padding along ``d`` that ``node`` holds: a pad node's, or the one its slice / join inputs share."""
    found = _pads(node)
    if found is not None:
        pads, mode = found
        before, after = _dim_pads(pads, len(shape(node)), d)
        return None if before == after == 0 or min(before, after) < 0 else (before, after, mode)
    if _carrier_dim(node, d) is None:
        return None
    infos = {_pad_origin(p, d) for p in node.all_input_nodes if isinstance(val(p), torch.Tensor)}
    return infos.pop() if len(infos) == 1 else None


def _read_by_convolutions(node: torch.fx.Node, d: int, info: tuple[int, int, str]) -> bool:
    if not node.users:
        return False
    for u in node.users:
        if _carrier_dim(u, d) is not None:
            if _pad_origin(u, d) != info or not _read_by_convolutions(u, d, info):
                return False
            continue
        p = conv_params(u) if ops.of(u).family == "conv" and u.args[0] is node else None
        if p is None or any(a is node for a in u.args[1:]):
            return False
        i = d - 2
        if p["stride"][i] != 1 or p["dilation"][i] != 1 or p["padding"][i] or p["kernel"][i] != info[0] + info[1] + 1:
            return False
    return True


def _carrier_dim(node: torch.fx.Node, d: int) -> int | None:
    """The dim a slice or join works along, where it is not ``d`` (rows pass through it), else None."""
    if node.op != "call_function" or not isinstance(val(node), torch.Tensor):
        return None
    if node.target is ops.SLICE:
        dim = arg(node, 1, "dim", 0)
    elif ops.of(node).family == "join":
        dim = arg(node, 1, "dim", 0)
    else:
        return None
    dim = dim % len(shape(node))
    return dim if dim != d else None


def logical_rows(node: torch.fx.Node, d: int) -> int:
    """The rows of ``node`` along ``d`` as bands count them: a folded pad keeps its input's."""
    fp = folded_pad(node, d)
    return shape(node)[d] - (fp[0] + fp[1] if fp else 0)


def row_rule(node: torch.fx.Node, d: int) -> dict[torch.fx.Node, object] | None:
    """How ``node`` reads each tensor input when its output is banded along dim ``d``, or None."""
    t = node.target
    if node.op != "call_function" or not isinstance(val(node), torch.Tensor):
        return None
    if _pads(node) is not None and folded_pad(node, d) is not None:
        return {node.args[0]: RowReq(d)}
    if ops.of(node).family == "conv":
        p = conv_params(node) if d >= 2 else None
        if p is None:
            return None
        i = d - 2
        k, pad, mode = p["kernel"][i], p["padding"][i], "zeros"
        fp = folded_pad(node.args[0], d)
        if fp is not None:
            pad, mode = fp[0], fp[2]  # the pad before it pads these rows: the halo's edge rows
        elif 2 * pad != k - 1:
            return None
        if p["stride"][i] != 1 or p["dilation"][i] != 1:
            return None
        req: dict = {node.args[0]: RowReq(d, "conv" if k > 1 else "same", k, pad, mode=mode), node.args[1]: WHOLE}
        if isinstance(p["bias"], torch.fx.Node):
            req[p["bias"]] = WHOLE
        return req
    if ops.of(node).family == "upsample":
        x = node.args[0]
        if d < 2 or shape(node)[d] % shape(x)[d]:
            return None
        f = shape(node)[d] // shape(x)[d]
        return {x: RowReq(d, "up" if f > 1 else "same", factor=f)}
    if t is ops.GROUP_NORM:
        if d < 2:
            return None
        req = {node.args[0]: RowReq(d)}
        for p in node.args[2:4]:
            if isinstance(p, torch.fx.Node):
                req[p] = WHOLE
        return req
    try:
        axes = input_axes(node, SliceAxis(d, 1))
    except SplitReduction:
        return None
    if axes is None:
        merged = _merged_rows(node, d)
        return None if merged is None else {node.args[0]: RowReq(merged[0], "up", factor=merged[1])}
    req = {}
    for p, a in axes.items():
        if a is WHOLE:
            req[p] = WHOLE
        elif isinstance(a, SliceAxis) and a.unit == 1:
            req[p] = RowReq(a.dim)
        else:
            return None
    return req


def _merged_rows(node: torch.fx.Node, d: int) -> tuple[int, int] | None:
    """``(input dim, factor)`` when reshape ``node`` merges an input dim with the dims after it into its output dim
    ``d`` (depth-to-space: LTX-Video's and Mochi's upsamplers, ``(.., H, p, ..) -> (.., H * p, ..)``): output rows
    ``[a, b)`` come from input rows ``[a // p, ceil(b / p))``, as a nearest upsampling's. None otherwise."""
    if ops.of(node).family != "reshape" or not isinstance(node.args[0], torch.fx.Node):
        return None
    x = node.args[0]
    for gi, gj in view_groups(shape(x), shape(node)) or []:
        if d in gj:
            outs = [j for j in gj if shape(node)[j] != 1]
            ins = [i for i in gi if shape(x)[i] != 1]
            if outs != [d] or len(ins) < 2:
                return None
            return ins[0], math.prod(shape(x)[i] for i in ins[1:])
    return None


@dataclass
class RowSegment:
    """A stretch of the graph from one full-size tensor (``input``) to another (``output``), banded by rows.

    A chunk of a decode loop (Wan's per-latent-frame decoder, CogVideoX's frame batches) also reads the causal
    convolutions' cache of the chunk before and makes its own for the next: ``side_inputs`` are tensors made
    outside the segment that it reads by bands (held whole by the caller), ``side_outputs`` nodes of the segment
    that are read outside it, written band by band into full-size tensors as the output is."""

    input: torch.fx.Node
    output: torch.fx.Node
    nodes: list[torch.fx.Node]  # topological, without the input
    row_dim: dict[torch.fx.Node, int]
    rows: dict[torch.fx.Node, int]
    reqs: dict[torch.fx.Node, dict[torch.fx.Node, object]]
    externals: list[torch.fx.Node]  # read whole (the side inputs among them)
    level: dict[torch.fx.Node, int]  # the pass from which a node can run (GroupNorms: after their statistics)
    length: int  # band positions: every node's rows are a multiple of it
    norms: list[torch.fx.Node] = field(default_factory=list)
    side_inputs: list[torch.fx.Node] = field(default_factory=list)
    side_outputs: list[torch.fx.Node] = field(default_factory=list)
    memo: dict[str, dict] = field(default_factory=dict, repr=False)  # per-node facts the planner reuses
    shared: dict = field(default_factory=dict, repr=False)  # facts shared by the segments of one analysis

    @property
    def num_passes(self) -> int:
        return self.level[self.output] + 1

    @property
    def name(self) -> str:
        paths = [module_path(n) for n in self.nodes if module_path(n)]
        first, last = (paths[0], paths[-1]) if paths else (self.input.name, self.output.name)
        return first if first == last else f"{first} .. {last}"

    @property
    def finest(self) -> int:
        """Band positions of the finest bands: every node's rows divide it (the output's rows, in a decoder)."""
        if "finest" not in self.memo:
            self.memo["finest"] = math.lcm(*self.rows.values())
        return self.memo["finest"]

    def upto(self, n: torch.fx.Node, end: int) -> int:
        """Rows of ``n`` that the bands before position ``end`` (of :attr:`finest`) own: a band finer than a row
        of ``n`` owns the row it starts, so every row has one owner."""
        return -(-end * self.rows[n] // self.finest)

    def bounds(self, bands: int) -> list[tuple[int, int]]:
        """The bands' positions (of :attr:`finest`): up to :attr:`length` bands, whole rows of every node
        (``slice_bounds`` of the length); more, finer bands: some nodes' rows are owned by one band of several,
        which the others read as rows kept from above (a latent row under several bands of output rows)."""
        if bands <= self.length:
            f = self.finest // self.length
            return [(a * f, b * f) for a, b in slice_bounds(self.length, bands)]
        return slice_bounds(self.finest, bands)

    def finer(self) -> list[int]:
        """Band counts finer than :attr:`length` whose bands are equal and split every row of every node
        evenly (the length times a power of two that divides :attr:`finest` / :attr:`length`)."""
        f, m, out = self.finest // self.length, 2, []
        while m <= min(f, MAX_SPLIT) and f % m == 0:
            out.append(self.length * m)
            m *= 2
        return out

    def period(self, bands: int) -> int:
        """Bands after which the pattern of rows each band computes repeats (one per length position)."""
        return max(1, -(-bands // self.length))

    def stats_targets(self, j: int) -> list[torch.fx.Node]:
        return [g for g in self.norms if self.level[g] - 1 == j]

    @property
    def remat(self) -> frozenset[torch.fx.Node]:
        """The nodes a band may recompute over the rows the next ops read from above it, instead of keeping
        them from the previous band (:func:`rematerialized`; :func:`recomputed` says where the planner does)."""
        if "remat" not in self.memo:
            self.memo["remat"] = rematerialized(self)
        return self.memo["remat"]


class RowAnalysis:
    """Row-streaming facts of one graph: segments between cut points, checked and memoised."""

    def __init__(self, gm: torch.fx.GraphModule, costs: DeviceCosts | None = None):
        self.gm = gm
        self.order = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.order)}
        out = self.order[-1]
        flat = [a for a in torch.fx.node.map_aggregate(out.args[0], lambda a: a) if isinstance(a, torch.fx.Node)] \
            if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        tensors = [a for a in flat if isinstance(a, torch.fx.Node) and isinstance(val(a), torch.Tensor)]
        self.graph_output = tensors[0] if len(tensors) == 1 else None
        self._down: dict[torch.fx.Node, set[torch.fx.Node]] = {}
        self._segments: dict[tuple[str, str], RowSegment | None] = {}
        # segment_estimate's statistics passes, shared by segments from one input; the device costs it predicts
        # seconds with, and the graph's node costs
        self._shared: dict = {"costs": costs if costs is not None else costs_for("cpu")}
        self._rules: dict[tuple[torch.fx.Node, int], dict | None] = {}
        self._logical: dict[tuple[torch.fx.Node, int], int] = {}
        self._cuts: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self._ends: list[torch.fx.Node] | None = None

    def logical(self, n: torch.fx.Node, d: int) -> int:
        """:func:`logical_rows`, memoised."""
        key = (n, d)
        if key not in self._logical:
            self._logical[key] = logical_rows(n, d)
        return self._logical[key]

    def rule(self, n: torch.fx.Node, d: int) -> dict[torch.fx.Node, object] | None:
        """:func:`row_rule`, memoised (every segment through ``n`` asks it)."""
        key = (n, d)
        if key not in self._rules:
            self._rules[key] = row_rule(n, d)
        return self._rules[key]

    def downstream(self, c: torch.fx.Node) -> set[torch.fx.Node]:
        if c not in self._down:
            seen: set[torch.fx.Node] = set()
            stack = list(c.users)
            while stack:
                n = stack.pop()
                if n in seen or n.op == "output":
                    continue
                seen.add(n)
                stack.extend(n.users)
            self._down[c] = seen
        return self._down[c]

    def segment(self, c_in: torch.fx.Node, c_out: torch.fx.Node, limit: bool = True) -> RowSegment | None:
        """The segment from ``c_in`` to ``c_out``: the output's :meth:`region` where ``c_in`` is its first input,
        else what lies between them; with ``limit``, None past ``MAX_PASSES`` passes."""
        key = (c_in.name, c_out.name, limit)
        if key not in self._segments:
            region = self.region() if c_out is self.graph_output else None
            seg = region if region is not None and region.input is c_in else self._build(c_in, c_out, limit)
            if seg is not None:
                seg.shared = self._shared
            self._segments[key] = seg
        return self._segments[key]

    def region(self) -> RowSegment | None:
        """Everything the graph's output needs that no band-barrier needs, as one segment (or None): a decode
        loop's chunks each pass a barrier (Wan's per-frame attention in every chunk's mid-block), so no tail
        after the last one covers the earlier chunks; their tails are one segment that reads every chunk's
        mid-block output (the first its input, the others side inputs, by bands) and runs all chunks' up
        blocks band by band, their causal caches a band's rows at a time."""
        if "region" in self._shared:
            return self._shared["region"]
        self._shared["region"] = None
        out = self.graph_output
        if out is None or len(self.ends()) < 2:
            return None  # a tail without chunks: the chains of segments between cut points
        need: set[torch.fx.Node] = set()
        stack = [out]
        while stack:
            n = stack.pop()
            if n not in need:
                need.add(n)
                stack.extend(n.all_input_nodes)
        upstream: set[torch.fx.Node] = set()
        stack = [n for n in need if self._barrier(n)]
        if not stack:
            return None
        while stack:
            n = stack.pop()
            if n not in upstream:
                upstream.add(n)
                stack.extend(n.all_input_nodes)
        seg = {n for n in need - upstream if n.op == "call_function"}
        if not seg:
            return None
        self._shrink_sources(seg, out)
        self._pull_copies(seg, out)
        nodes = sorted(seg, key=self.index.__getitem__)
        if any(n is not out and any(u not in seg for u in n.users) for n in nodes):
            return None
        inputs = sorted({p for n in nodes for p in n.all_input_nodes if p not in seg and p.op != "get_attr"
                         and isinstance(val(p), torch.Tensor) and val(p).dim() >= 3}, key=self.index.__getitem__)
        for c_in in inputs[:1]:
            for d_in in range(2, val(c_in).dim()):
                built = self._dims(c_in, d_in, nodes)
                if built is not None and len(built.side_inputs) + 1 >= len(inputs) // 2:
                    built.shared = self._shared
                    self._shared["region"] = built
                    return built
        return None

    def _build(self, c_in: torch.fx.Node, c_out: torch.fx.Node, limit: bool = True) -> RowSegment | None:
        down = self.downstream(c_in)
        if c_out not in down or not isinstance(val(c_in), torch.Tensor) or val(c_in).dim() < 3:
            return None
        seg: set[torch.fx.Node] = set()
        stack = [c_out]
        while stack:
            n = stack.pop()
            if n in seg or n not in down:
                continue
            seg.add(n)
            stack.extend(n.all_input_nodes)
        self._pull_copies(seg, c_in)
        nodes = sorted(seg, key=self.index.__getitem__)
        leaving = [n for n in nodes if n is not c_out and any(u not in seg for u in n.users)]
        if any(not isinstance(val(n), torch.Tensor) or ops.of(n).alias is not ops.Alias.NONE for n in leaving):
            return None  # a value leaving the segment must be a tensor of its own, written band by band
        for d_in in range(2, val(c_in).dim()):
            built = self._dims(c_in, d_in, nodes, limit)
            if built is not None:
                built.side_outputs = leaving
                return built
        return None

    def _shrink_sources(self, seg: set[torch.fx.Node], out: torch.fx.Node) -> None:
        """Leave out of the region the nodes at its start that hold no more than the inputs they alone read
        (each chunk's attention output projected and added to its residual: one tensor whole before the
        region instead of two); they run whole, at the latent's size, where they are."""
        changed = True
        while changed:
            changed = False
            for n in sorted(seg, key=self.index.__getitem__):
                if n is out or any(p in seg for p in n.all_input_nodes) or not isinstance(val(n), torch.Tensor):
                    continue
                alone = [p for p in n.all_input_nodes if p.op != "get_attr" and isinstance(val(p), torch.Tensor)
                         and all(u is n or u not in seg for u in p.users)]
                if alone and tensor_bytes(val(n)) <= sum(tensor_bytes(val(p)) for p in alone):
                    seg.discard(n)
                    changed = True

    @staticmethod
    def _pull_copies(seg: set[torch.fx.Node], c_in: torch.fx.Node) -> None:
        """Add to ``seg`` the copies taken of its values through views (a causal convolution's cache,
        ``x[:, :, -2:].clone()``, read by the next chunk): the segment then hands out the copy, a few frames,
        instead of the whole value it was taken from."""
        for n in [c_in, *seg]:
            stack = [(u, ()) for u in n.users]
            while stack:
                u, chain = stack.pop()
                if u in seg or u.op != "call_function":
                    continue
                if u.target is ops.CLONE:
                    if all(set(v.users) <= {*chain, u} for v in chain):  # no view of it leaves
                        seg.update((*chain, u))
                elif ops.of(u).alias is ops.Alias.VIEW and len(u.all_input_nodes) == 1:
                    stack.extend((w, (*chain, u)) for w in u.users)

    def _dims(self, c_in, d_in, nodes, limit: bool = True) -> RowSegment | None:
        row_dim = {c_in: d_in}
        rows = {c_in: shape(c_in)[d_in]}
        reqs: dict = {}
        externals: list[torch.fx.Node] = []
        sides: list[torch.fx.Node] = []
        inside = set(nodes)
        for n in nodes:
            ins = n.all_input_nodes
            found = None
            # the input's row dim (counted from the last: (B*T, C, H, W) next to (B, C, T, H, W)) first: a side
            # input takes the dim its first reader bands it along
            nd = len(shape(n) or ())
            for d in sorted(range(2, nd), key=lambda d: d - nd != d_in - len(shape(c_in))):
                r = self.rule(n, d)
                if r is None or any(p not in r for p in ins if isinstance(val(p), torch.Tensor)):
                    continue
                ok = True
                new_sides = {}
                for p in ins:
                    a = r.get(p)
                    if isinstance(a, RowReq) and p not in row_dim:  # made outside: a side input, read by bands
                        if p.op == "get_attr" or a.dim >= len(shape(p) or ()):
                            ok = False
                            break
                        new_sides[p] = a.dim
                        rows_p = shape(p)[a.dim]
                    elif p in row_dim:
                        rows_p = rows[p]
                    if isinstance(a, RowReq):
                        dim_p = new_sides.get(p, row_dim.get(p))
                        if a.dim != dim_p or rows_p * (a.factor if a.kind == "up" else 1) != self.logical(n, d):
                            ok = False
                    elif p in row_dim:
                        ok = False
                    if not ok:
                        break
                if ok:
                    found = (d, r, new_sides)
                    break
            if found is None:
                return None
            d, r, new_sides = found
            for p, dim_p in new_sides.items():
                row_dim[p], rows[p] = dim_p, shape(p)[dim_p]
                sides.append(p)
            row_dim[n], rows[n], reqs[n] = d, self.logical(n, d), r
            for p in ins:
                if p not in inside and p is not c_in and p not in externals:
                    externals.append(p)
        length = math.gcd(*rows.values())
        level = {c_in: 0}
        norms = []
        for n in nodes:
            lv = max((level[p] for p in n.all_input_nodes if p in level), default=0)
            if n.target is ops.GROUP_NORM:
                lv = level.get(n.args[0], 0) + 1  # (a side input is whole from the start)
                norms.append(n)
            level[n] = lv
        if limit and level[nodes[-1]] + 1 > MAX_PASSES:
            return None
        return RowSegment(c_in, nodes[-1], nodes, row_dim, rows, reqs, externals, level, length, norms,
                          side_inputs=sides)

    def _barrier(self, n: torch.fx.Node) -> bool:
        """A node no band can pass: along every dim it needs a large input whole (attention keys, a
        reduction over the rows)."""
        if n.op != "call_function" or not isinstance(val(n), torch.Tensor) or val(n).dim() < 3:
            return False
        for d in range(2, val(n).dim()):
            r = self.rule(n, d)
            if r is not None and not any(a is WHOLE and p.op != "get_attr" and isinstance(val(p), torch.Tensor)
                                         and val(p).dim() >= 3 for p, a in r.items()):
                return False
        return True

    def ends(self) -> list[torch.fx.Node]:
        """Where streamed tails can end, in graph order: the graph's output and, where it joins chunks along a
        dim (a decode loop's ``cat`` of its chunks' outputs, then a ``clamp``), each chunk's output."""
        if self._ends is None:
            found: list[torch.fx.Node] = []
            stack = [self.graph_output] if self.graph_output is not None else []
            while stack:
                n = stack.pop()
                if n in found:
                    continue
                found.append(n)
                tensors = [p for p in n.all_input_nodes if isinstance(val(p), torch.Tensor) and p.op != "get_attr"]
                if n.op == "call_function" and (ops.of(n).family == "join" or (
                        len(tensors) == 1 and ops.of(n).dims is pointwise)):
                    stack.extend(tensors)
            self._ends = sorted(found, key=self.index.__getitem__)
        return list(self._ends)

    def cut_points(self, end: torch.fx.Node | None = None) -> list[torch.fx.Node]:
        """Tensors from which the graph can be row-streamed up to ``end`` (the graph's output by default), in
        graph order: after the last node before ``end`` no band can pass (and after the end before it), the
        graph's inputs and the last such tensor of each block (:func:`_block_keys`), skipping views."""
        end = self.graph_output if end is None else end
        if end is None:
            return []
        if end not in self._cuts:
            self._cuts[end] = self._cut_points(end)
        return list(self._cuts[end])

    def _cut_points(self, end: torch.fx.Node) -> list[torch.fx.Node]:
        first = 0
        for i in range(self.index[end], -1, -1):
            if self._barrier(self.order[i]):
                first = i + 1
                break
        earlier = [e for e in self.ends() if self.index[e] < self.index[end] and e not in end.all_input_nodes]
        if end is not self.graph_output and earlier:
            first = max(first, self.index[earlier[-1]] + 1)  # a chunk's tail starts after the chunk before
        region = self.order[first:self.index[end] + 1]
        best: dict[str, torch.fx.Node] = {}
        least: dict[str, torch.fx.Node] = {}
        keys = _block_keys(region)
        for n in region:
            if n.op not in ("call_function", "placeholder") or not isinstance(val(n), torch.Tensor) or val(n).dim() < 3:
                continue
            if ops.of(n).layout and aliases_input(n):
                continue
            built = None if n is end else self._build(n, end, limit=False)
            if built is None:
                continue  # (a tail with too many passes for one segment is still a start: the chain cuts it)
            key = n.name if n.op == "placeholder" else keys.get(n, "")
            best[key] = n
            if not built.side_inputs and (key not in least or tensor_bytes(val(n)) <= tensor_bytes(val(least[key]))):
                least[key] = n
        # each block's last tensor, and its least that alone starts a tail (no other tensor read by bands) where
        # that is smaller (Mochi's up blocks end in a depth-to-space of 8x their resnets' output)
        found = set(best.values()) | set(least.values())
        return sorted(found, key=self.index.__getitem__)


def _block_keys(nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, str]:
    """The block each node is in: its module path's first three names after the names every path shares
    (``up_blocks.0.resnets``, also inside a wrapper: ``vae.decoder.up_blocks.0.resnets``)."""
    paths = {n: module_path(n).split(".") for n in nodes if module_path(n)}
    common = 0
    if paths:
        first = next(iter(paths.values()))
        while common < len(first) and all(len(p) > common + 1 and p[common] == first[common] for p in paths.values()):
            common += 1
    return {n: ".".join(p[:common + 3]) for n, p in paths.items()}


# ----------------------------------------------------------------------------------------------------------------
# bands: what each pass computes, its program, its memory and its cost


def _row_bytes(n: torch.fx.Node, seg: RowSegment) -> int:
    memo = seg.memo.setdefault("row_bytes", {})
    if n not in memo:
        memo[n] = tensor_bytes(val(n)) // shape(n)[seg.row_dim[n]]  # (a folded pad's rows are wider)
    return memo[n]


def _band_alias(n: torch.fx.Node, seg: RowSegment) -> bool:
    """Whether ``n`` run on a band returns a view of its input's band (no new storage). As in the whole graph
    (``passes.memory``: views, eval dropout, same-dtype conversions), except that a reshape merging or
    splitting the row dim copies a band narrowed out of a wider buffer."""
    memo = seg.memo.setdefault("alias", {})
    if n not in memo:
        x = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
        alias = x is not None and x in seg.row_dim and returns_alias(n, x)
        if alias and ops.of(n).family == "reshape":
            d = seg.row_dim[x]
            groups = view_groups(shape(x), shape(n)) or []
            alias = any(d in gi and [i for i in gi if shape(x)[i] != 1] == [d]
                        and len([o for o in gj if shape(n)[o] != 1]) == 1 for gi, gj in groups)
        memo[n] = alias
    return memo[n]


def computed_rows(seg: RowSegment, j: int, end: int) -> dict[torch.fx.Node, int]:
    """How many leading rows of each node pass ``j`` has computed once the band ending at position ``end``
    is done: the rows its targets own, plus what the convolutions after each node read ahead."""
    hi: dict[torch.fx.Node, int] = {}

    def up(n, h):
        if h > hi.get(n, -1):
            hi[n] = h

    for g in seg.stats_targets(j):
        up(g.args[0], seg.upto(g.args[0], end))
    if j == seg.num_passes - 1:
        for o in (seg.output, *seg.side_outputs):
            up(o, seg.upto(o, end))
    for n in reversed(seg.nodes):
        if n in hi:
            for p, r in seg.reqs[n].items():
                if isinstance(r, RowReq):
                    up(p, r.needed(0, hi[n], seg.rows[p])[1])
    return hi  # (with the rows read of the input and side inputs: not computed, they tell a band's reads)


def rematerialized(seg: RowSegment) -> frozenset[torch.fx.Node]:
    """Nodes whose rows above a band are recomputed rather than kept: memory-bound ops (pointwise, copies,
    pads, joins, nearest upsampling, views) whose rows cost no more to recompute from what is kept than to keep
    (``REMAT_GROWTH``). A convolution's input is typically such a chain from the residual stream (norm, SiLU,
    the causal cache joined, the pad; an upsampler's rows cast to fp32, upsampled and cast back): kept, it costs
    a few rows of every link at full width; recomputed, the rows of the chain's start, which the residual add
    keeps anyway, or the half-width rows an upsampling reads. What a recomputed node costs to keep is what its
    inputs cost (a view: its base's; the segment's inputs nothing: the caller holds them whole), in bytes of
    whole values (a node's kept rows are a fraction of it, and its inputs' the same fraction). The
    recomputation is a few rows per band of ops that cost their bytes (the time model charges it)."""
    out = set()
    outputs = {seg.output, *seg.side_outputs}
    keep_cost: dict[torch.fx.Node, int] = {seg.input: 0, **{p: 0 for p in seg.side_inputs}}
    for n in seg.nodes:
        own = tensor_bytes(val(n))
        keep_cost[n] = own
        kind = op_class(n)  # (convolutions, attention and norms are classes of their own)
        if n in outputs or kind not in ("pointwise", "copy", "view"):
            continue
        banded = _banded_inputs(n, seg)
        if not banded:
            continue
        if kind == "view" and n.args and n.args[0] in banded:
            banded = [n.args[0]]  # a view's rows are its base's
        cost = sum(keep_cost[p] for p in banded)
        if cost <= REMAT_GROWTH * own:
            out.add(n)
            keep_cost[n] = min(cost, own)
    return frozenset(out)


def _buffer_starts(seg: RowSegment, order, before: dict, now: dict,
                   remat: frozenset = frozenset()) -> dict[torch.fx.Node, int]:
    """The first row of each node a band must hold: its new rows, and the rows before them that the next
    ops read (a convolution's rows above, kept from the previous band). A rematerialized node computes its
    rows from its first held one, so its inputs' rows start earlier (the consumers come later in ``order``:
    walked backwards, each node's start is final before it asks its inputs)."""
    start = {n: before.get(n, 0) for n in order}
    for n in reversed(order):
        a, b = (start[n] if n in remat else before.get(n, 0)), now[n]
        if b <= a:
            continue
        for p, r in seg.reqs[n].items():
            if isinstance(r, RowReq):
                first = r.needed(a, b, seg.rows[p])[0]
                start[p] = min(start[p], first) if p in start else first
    return start  # (with the first row read of the input and side inputs, read in place)


def _family(n: torch.fx.Node, seg: RowSegment) -> str | None:
    memo = seg.memo.setdefault("family", {})
    if n not in memo:
        memo[n] = ops.of(n).family
    return memo[n]


def _folded(n: torch.fx.Node, seg: RowSegment) -> bool:
    """Whether ``n`` is a pad folded into its convolutions' halo along its row dim (:func:`folded_pad`)."""
    memo = seg.memo.setdefault("folded", {})
    if n not in memo:
        memo[n] = _pads(n) is not None and folded_pad(n, seg.row_dim[n]) is not None
    return memo[n]


def _conv_params(n: torch.fx.Node, seg: RowSegment) -> dict:
    memo = seg.memo.setdefault("conv", {})
    if n not in memo:
        memo[n] = conv_params(n)
    return memo[n]


def _banded_inputs(n: torch.fx.Node, seg: RowSegment) -> list[torch.fx.Node]:
    """The inputs ``n`` reads as bands, its first argument first (the base a view shares)."""
    memo = seg.memo.setdefault("banded", {})
    if n not in memo:
        ins = [p for p, r in seg.reqs[n].items() if isinstance(r, RowReq)]
        x = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
        memo[n] = ([x] if x in ins else []) + [p for p in ins if p is not x]
    return memo[n]


class _PassBuilder:
    """Builds one pass's program, band after band. Each band computes only the rows of each node that are new
    (line-buffered streaming): rows a convolution needs from above its band were computed by the previous
    band and are kept (a few rows per convolution input), never recomputed."""

    def __init__(self, seg: RowSegment, j: int, bounds: list[tuple[int, int]], ext_index, norm_key,
                 emit: bool = True, remat: frozenset = frozenset()):
        self.seg, self.j, self.bounds = seg, j, bounds
        self.remat = remat  # nodes recomputed over the rows above each band (:func:`rematerialized`)
        self.emit = emit  # False: the instructions carry their slots and bytes only (for the planner's trials)
        self.targets = seg.stats_targets(j)
        self.final = j == seg.num_passes - 1
        self.ext_index, self.norm_key = ext_index, norm_key
        self.counter = 1
        self.carry: dict[torch.fx.Node, int] = {}  # node -> slot with its rows kept from the previous band
        self.recomputed: dict[torch.fx.Node, int] = {}  # rematerialized node -> rows above the bands after the first
        self.order: list[torch.fx.Node] | None = None
        self._hi: dict[int, dict] = {}
        self._starts: dict[int, dict] = {}
        self._raw: dict[int, dict] = {}
        # side inputs: negative slots, bound to the whole tensors before the bands; outputs: the output first
        self.side_slot = {p: -1 - i for i, p in enumerate(seg.side_inputs)}
        self.out_index = {o: k for k, o in enumerate((seg.output, *seg.side_outputs))}
        self.outside = {seg.input, *seg.side_inputs}  # read in place, by absolute rows
        self._deltas: dict[int, dict | None] = {}  # positions moved -> each node's rows moved (None: not whole)

    def new_slot(self) -> int:
        self.counter += 1
        return self.counter - 1

    def hi(self, s: int) -> dict:
        """:func:`computed_rows` once band ``s`` is done ({} outside the bands)."""
        if s < 0 or s >= len(self.bounds):
            return {}
        if s not in self._hi:
            self._hi[s] = computed_rows(self.seg, self.j, self.bounds[s][1])
        return self._hi[s]

    def starts(self, s: int) -> dict[torch.fx.Node, int]:
        """The first row of each node band ``s`` holds (band ``s - 1`` asked for them as its next band's):
        :func:`_buffer_starts` of the band, and of the bands up to a period ahead for the rows it does not
        read but keeps for them (bands finer than a row of a node: a band that computes none of its rows
        passes on the rows above that a later band reads)."""
        if s not in self._starts:
            last = min(s + self.seg.period(len(self.bounds)), len(self.bounds) - 1)
            self._raw = {k: v for k, v in self._raw.items() if k >= s}
            raw = [self._raw_starts(t) for t in range(s, last + 1)]
            outside = self.outside
            held = raw[0] if len(raw) == 1 else {n: a if n in self.remat or n in outside else
                                                 min(a, *(r[n] for r in raw[1:])) for n, a in raw[0].items()}
            keep = s - 2 - self.seg.period(len(self.bounds))  # (:meth:`bands` compares a period back)
            self._starts = {k: v for k, v in self._starts.items() if k >= keep}
            self._starts[s] = held
        return self._starts[s]

    def _raw_starts(self, s: int) -> dict[torch.fx.Node, int]:
        if s not in self._raw:
            self._raw[s] = _buffer_starts(self.seg, self.order, self.hi(s - 1), self.hi(s), self.remat)
        return self._raw[s]

    def bands(self) -> Iterator[list[tuple]]:
        """Every band's program, in order. Where a band repeats the band a period above it a period further
        down (every node's rows computed, held and kept shifted by its rows per period, the same rows carried
        in), its program is that band's on other slots and rows: shifted, not built again (all but the first
        and last few of a segment's bands, in every pass)."""
        n_b, p = len(self.bounds), self.seg.period(len(self.bounds))
        built: dict[int, list[tuple]] = {}
        marks: dict[int, tuple[int, dict]] = {}  # band -> (the slot counter, the carried rows) entering it
        for s in range(n_b):
            marks[s] = (self.counter, dict(self.carry))
            t = s - p
            shift = self._translation(t, s, marks) if t >= 1 else None
            if shift is None:
                prog = self.band(s)
            else:
                d = shift[0]
                prog = _shifted(built[t], *shift)
                self.counter = marks[t + 1][0] + d
                self.carry = {n: c + d for n, c in marks[t + 1][1].items()}
            built[s] = prog
            for k in [k for k in built if k < s - p]:
                del built[k], marks[k]
            yield prog

    def _translation(self, t: int, s: int, marks: dict) -> tuple | None:
        """(slot shift, rows shift of the input and of each side input by slot, rows shift of each output)
        where band ``s`` repeats band ``t`` shifted, else None."""
        seg, bounds = self.seg, self.bounds
        (a_t, b_t), (a_s, b_s) = bounds[t], bounds[s]
        if b_s - a_s != b_t - a_t or s + 1 >= len(bounds):
            return None
        moved = a_s - a_t
        if moved not in self._deltas:
            whole = all(moved * r % seg.finest == 0 for r in seg.rows.values())
            self._deltas[moved] = {n: moved * r // seg.finest for n, r in seg.rows.items()} if whole else None
        delta = self._deltas[moved]
        if delta is None:
            return None
        for x_t, x_s in ((self.hi(t - 1), self.hi(s - 1)), (self.hi(t), self.hi(s)),
                         (self.starts(t), self.starts(s)), (self.starts(t + 1), self.starts(s + 1))):
            if len(x_t) != len(x_s) or any(x_s.get(n, -1) != v + delta[n] for n, v in x_t.items()):
                return None
        d = marks[s][0] - marks[t][0]
        if marks[s][1] != {n: c + d for n, c in marks[t][1].items()}:
            return None
        rows = {0: delta[seg.input], **{slot: delta[q] for q, slot in self.side_slot.items()}}
        outs = {k: delta[o] for o, k in self.out_index.items()}
        return d, rows, outs

    def band(self, s: int) -> list[tuple]:
        seg = self.seg
        before, now = self.hi(s - 1), self.hi(s)
        if self.order is None:
            self.order = [n for n in seg.nodes if n in now]
        order = self.order
        start = self.starts(s)
        nxt = self.starts(s + 1) if s + 1 < len(self.bounds) else None
        a_pos, b_pos = self.bounds[s]
        prog: list[tuple] = []
        buf: dict[torch.fx.Node, int] = {}

        def rows_of(p, a, b):
            if p is seg.input:
                return Band(0, seg.row_dim[p], a, b - a)
            if p in self.side_slot:
                return Band(self.side_slot[p], seg.row_dim[p], a, b - a)
            return Band(buf[p], seg.row_dim[p], a - start[p], b - a)

        for g in self.targets:
            x = g.args[0]
            if x is seg.input or x in self.side_slot:
                oa, ob = seg.upto(x, a_pos), seg.upto(x, b_pos)
                if ob > oa:
                    prog.append(("stats", self.norm_key[g], rows_of(x, oa, ob), g.args[1],
                                 (ob - oa) * _row_bytes(x, seg)))
        remat = self.remat
        for n in order:
            a, b = before.get(n, 0), now[n]
            d = seg.row_dim[n]
            parts = []
            lo = a
            if n in remat:
                lo = start[n]  # the rows above recomputed, not kept
                if s >= 1:
                    self.recomputed[n] = self.recomputed.get(n, 0) + a - lo
            elif n in self.carry:
                parts.append(self.carry.pop(n))
            elif start[n] < a:
                raise AssertionError(f"rows of {n.name} above band {s} were not kept")
            if b > lo:
                parts.append(self._compute(n, lo, b, rows_of, prog))
            if not parts:
                continue
            if len(parts) == 2:
                joined = self.new_slot()
                prog.append(("op", joined, torch.cat, ([Band(parts[0], None), Band(parts[1], None)], d), {}, None,
                             (b - start[n]) * _row_bytes(n, seg)))
                buf[n] = joined
            else:
                buf[n] = parts[0]
            if b > a:
                for g in self.targets:
                    if g.args[0] is n:  # the statistics copy a band narrowed out of a wider buffer
                        copy = (b - a) * _row_bytes(n, seg) if start[n] < a else 0
                        prog.append(("stats", self.norm_key[g], rows_of(n, a, b), g.args[1], copy))
                if self.final and n in self.out_index:
                    prog.append(("out", rows_of(n, a, b), (a, b - a), self.out_index[n]))
        keep = {}
        if nxt is not None:
            for n, slot in buf.items():
                if nxt[n] < now[n] and n not in remat:
                    keep[slot] = (n, nxt[n] - start[n], now[n] - nxt[n])
        return self._with_frees(prog, keep)

    def _compute(self, n, lo, hi, rows_of, prog) -> int:
        """Emit the instruction computing rows ``[lo, hi)`` of ``n`` (and a padding before a convolution at an
        image edge); return the slot holding them. Without ``emit``, an instruction's arguments are only the
        bands it reads (its base first), which is all :func:`simulate` reads: the same slots and bytes."""
        seg = self.seg
        d = seg.row_dim[n]
        reqs = seg.reqs[n]

        def band(p):
            pa, pb, _, _ = reqs[p].needed(lo, hi, seg.rows[p])
            return rows_of(p, pa, pb)

        fn, kwargs, post = None, {}, None
        nbytes = (hi - lo) * _row_bytes(n, seg)
        family = _family(n, seg)
        inputs = _banded_inputs(n, seg)
        reads = [band(p) for p in inputs]
        banded = dict(zip(inputs, reads))

        def mapped(p):
            return banded[p] if p in banded else Ext(self.ext_index[p])

        if family == "conv":
            prm = _conv_params(n, seg)
            x = n.args[0]
            _, _, top, bot = reqs[x].needed(lo, hi, seg.rows[x])
            padding = list(prm["padding"])
            xin = reads[0]
            replicate = reqs[x].mode == "replicate"
            if top == bot and not (replicate and top):
                padding[d - 2] = top
            else:
                padding[d - 2] = 0
                tmp = self.new_slot()
                spec = _pad_spec(len(shape(n)), d, top, bot, full=replicate)
                prog.append(("op", tmp, F.pad, (xin, spec), {"mode": "replicate"} if replicate else {}, None,
                             (xin.length + top + bot) * _row_bytes(x, seg)))
                xin = reads[0] = Band(tmp, None)
            if self.emit:
                bias = prm["bias"]
                fn = conv_rows
                args = (xin, mapped(n.args[1]), mapped(bias) if isinstance(bias, torch.fx.Node) else None,
                        prm["stride"], padding, prm["dilation"], False, [0] * len(padding), prm["groups"])
        elif family == "upsample":
            x = n.args[0]
            r = reqs[x]
            pa, pb, _, _ = r.needed(lo, hi, seg.rows[x])
            nbytes = (pb - pa) * r.factor * _row_bytes(n, seg)
            if self.emit:
                args = list(torch.fx.node.map_arg(n.args, mapped))
                size = n.args[1]
                if size is not None:
                    size = list(size)
                    size[d - 2] = (pb - pa) * r.factor
                    args[1] = size
                fn, args, kwargs = n.target, tuple(args), dict(n.kwargs)
                if lo - pa * r.factor or hi - lo != (pb - pa) * r.factor:
                    post = (d, lo - pa * r.factor, hi - lo)
        elif n.target is ops.GROUP_NORM:
            if self.emit:
                groups = n.args[1]
                w, bias = arg(n, 2, "weight"), arg(n, 3, "bias")
                eps = arg(n, 4, "eps", 1e-5)
                fn = group_norm_rows
                args = (reads[0], Stats(self.norm_key[n]), groups,
                        mapped(w) if isinstance(w, torch.fx.Node) else None,
                        mapped(bias) if isinstance(bias, torch.fx.Node) else None, eps)
        elif family == "reshape" and reqs[n.args[0]].kind == "up":  # depth-to-space: whole input rows, narrowed
            x = n.args[0]
            r = reqs[x]
            pa, pb, _, _ = r.needed(lo, hi, seg.rows[x])
            nbytes = (pb - pa) * r.factor * _row_bytes(n, seg)
            if self.emit:
                args, kwargs = sliced_args(n, SliceAxis(d, 1), (pb - pa) * r.factor)
                fn = ops.RESHAPE if n.target in (ops.VIEW, ops.UNSAFE_VIEW) else n.target
                args = torch.fx.node.map_arg(args, mapped)
                if lo - pa * r.factor or hi - lo != (pb - pa) * r.factor:
                    post = (d, lo - pa * r.factor, hi - lo)
        elif _folded(n, seg):
            if self.emit:  # its other dims padded as in the graph; the convolutions pad the rows
                fn, kwargs = F.pad, {}
                pads, mode = _pads(n)
                i = 2 * (len(shape(n)) - 1 - d)
                pads[i:i + 2] = [0, 0]
                args = (reads[0], pads) + (("replicate",) if mode == "replicate" else ())
        else:
            if _band_alias(n, seg):
                nbytes = -1  # a view of its input's storage
            if self.emit:
                args, kwargs = sliced_args(n, SliceAxis(d, 1), hi - lo)
                fn = n.target
                if fn in (ops.VIEW, ops.UNSAFE_VIEW):
                    fn = ops.RESHAPE  # a band narrowed out of a wider one is strided: view may not apply
                args = torch.fx.node.map_arg(args, mapped)
                kwargs = torch.fx.node.map_arg(kwargs, mapped)
        if not self.emit:
            args = tuple(reads)
        slot = self.new_slot()
        prog.append(("op", slot, fn, tuple(args), dict(kwargs), post, nbytes))
        return slot

    def _with_frees(self, prog: list[tuple], keep: dict[int, tuple]) -> list[tuple]:
        """Free each slot after its last reader; a node's rows the next band needs are copied out first."""
        last: dict[int, int] = {}
        for i, ins in enumerate(prog):
            for s in _reads(ins):
                last[s] = i
            if ins[0] == "op":
                last.setdefault(ins[1], i)
        for s in keep:  # a kept node's buffer that nothing read this band (its carry alone)
            last.setdefault(s, -1)
        dies: dict[int, list[int]] = {}
        for s, i in last.items():
            if s > 0:  # slot 0 and the side inputs' are the caller's
                dies.setdefault(i, []).append(s)
        out: list[tuple] = []
        if -1 in dies:
            out.extend(self._release(dies[-1], keep))
        for i, ins in enumerate(prog):
            out.append(ins)
            if i in dies:
                out.extend(self._release(dies[i], keep))
        return out

    def _release(self, dead: list[int], keep: dict[int, tuple]) -> list[tuple]:
        out = []
        for s in dead:
            if s in keep:
                n, offset, length = keep[s]
                c = self.new_slot()
                out.append(("op", c, ops.CLONE, (Band(s, self.seg.row_dim[n], offset, length),), {}, None,
                            length * _row_bytes(n, self.seg)))
                self.carry[n] = c
        out.append(("free", dead))
        return out


def _shifted(prog: list[tuple], d: int, rows: dict[int, int], outs: dict[int, int]) -> list[tuple]:
    """``prog`` on slots ``d`` further (the caller's slots, 0 and the side inputs', stay) and rows further down:
    the input's and side inputs' (read in place, by absolute rows) by ``rows`` of their slot, the outputs'
    by ``outs``; a band of a buffer is relative to it and stays."""

    def band(b: Band) -> Band:
        return b._replace(slot=b.slot + d) if b.slot > 0 else b._replace(start=b.start + rows[b.slot])

    def arg(a):
        if isinstance(a, Band):
            return band(a)
        if isinstance(a, (list, tuple)) and any(isinstance(b, Band) for b in a):
            return type(a)(band(b) if isinstance(b, Band) else b for b in a)
        return a

    out = []
    for ins in prog:
        kind = ins[0]
        if kind == "op":
            _, slot, fn, args, kwargs, post, nbytes = ins
            out.append(("op", slot + d, fn, tuple(arg(a) for a in args),
                        {k: arg(v) for k, v in kwargs.items()} if kwargs else kwargs, post, nbytes))
        elif kind == "stats":
            out.append((kind, ins[1], band(ins[2]), *ins[3:]))
        elif kind == "out":
            _, b, (a, length), k = ins
            out.append((kind, band(b), (a + outs[k], length), k))
        else:
            out.append((kind, [x + d for x in ins[1]]))
    return out


def _reads(ins: tuple) -> list[int]:
    """Slots an instruction reads (Bands sit in its arguments, or in a list argument: torch.cat)."""
    kind = ins[0]
    if kind == "op":
        found = []
        for a in (*ins[3], *ins[4].values()):
            if isinstance(a, Band):
                found.append(a.slot)
            elif isinstance(a, (list, tuple)):
                found.extend(b.slot for b in a if isinstance(b, Band))
        return found
    if kind in ("stats", "out"):
        return [ins[2].slot] if kind == "stats" else [ins[1].slot]
    return []


def _pad_spec(ndim: int, d: int, top: int, bot: int, full: bool = False) -> list[int]:
    """``F.pad``'s spec adding ``top`` / ``bot`` rows along ``d``; ``full``: spelling out every dim after the
    first two (replicate padding of an N-d input takes all N - 2)."""
    pads = [0] * (2 * (ndim - (2 if full else d)))
    i = 2 * (ndim - 1 - d)
    pads[i], pads[i + 1] = top, bot
    return pads


def simulate(program: list[tuple]) -> int:
    """Peak bytes a program holds: its instructions carry the bytes each allocates (views share their base's
    storage, a free releases a storage with its last holder, statistics copy a band for one step), put through
    the one liveness computation of :func:`passes.memory.live_curve`."""
    owner: dict[int, int] = {}  # slot -> the slot whose storage it holds
    holders: dict[int, int] = {}
    first: dict[int, int] = {}
    size: dict[int, int] = {}
    spans: list[tuple[int, int, int]] = []
    transient = [0] * len(program)
    for i, ins in enumerate(program):
        if ins[0] == "op":
            slot, nbytes = ins[1], ins[6]
            base = next((a.slot for a in ins[3] if isinstance(a, Band)), None) if nbytes == -1 else None
            if base is not None and base in owner:
                owner[slot] = owner[base]
                holders[owner[slot]] += 1
            else:
                owner[slot], holders[slot], first[slot], size[slot] = slot, 1, i, max(nbytes, 0)
        elif ins[0] == "stats":
            transient[i] = ins[4]  # the band's statistics reshape a strided band: a copy
        elif ins[0] == "free":
            for s in ins[1]:
                o = owner.pop(s, None)
                if o is None:
                    continue
                holders[o] -= 1
                if holders[o] == 0:
                    spans.append((first.pop(o), i - 1, size.pop(o)))
    spans.extend((first[o], len(program) - 1, size[o]) for o in first)
    return max(live_curve(spans, transient), default=0)


def segment_estimate(seg: RowSegment, bands: int) -> tuple[int, float]:
    """(workspace bytes, predicted seconds) of running ``seg`` in ``bands`` bands. The workspace is
    :func:`simulate` on the first two bands of each pass, built without their arguments: bands are largest first
    and the rows kept between bands reach their steady state in the second, so this is the peak of the whole
    programs (``tests/test_rows.py`` holds it equal). The seconds: :func:`segment_loop` on the analysis's
    device costs."""
    memo = seg.memo.setdefault("estimates", {})
    if bands not in memo:
        ws, loop = _estimate(seg, bands)
        costs = seg.shared.get("costs") or costs_for("cpu")
        memo[bands] = (ws, loop.seconds(costs))
    return memo[bands]


def segment_loop(seg: RowSegment, bands: int) -> LoopCost:
    """What running ``seg`` in ``bands`` bands does (:class:`passes.timing.LoopCost`): every pass computes each
    node it needs once (pass ``j`` recomputes from the segment's input what its statistics need), reads the
    inputs of its statistics once more, and interprets its instructions band by band; the rows kept between
    bands, the joins and the outputs are copies."""
    return _estimate(seg, bands)[1]


def _estimate(seg: RowSegment, bands: int) -> tuple[int, LoopCost]:
    memo = seg.memo.setdefault("loops", {})
    if bands not in memo:
        # recomputing the rows above a band lowers the rows kept and widens each band's values: kept where it
        # lowers the workspace (many thin bands), not where the widened bands cost more (a few wide ones)
        plain = _estimate_with(seg, bands, frozenset())
        memo[bands] = (plain, frozenset())
        if seg.remat:
            remat = _estimate_with(seg, bands, seg.remat)
            if remat[0] < plain[0]:
                memo[bands] = (remat, seg.remat)
    return memo[bands][0]


def recomputed(seg: RowSegment, bands: int) -> frozenset[torch.fx.Node]:
    """The nodes the ``bands`` bands of ``seg`` recompute over the rows above each band (the planner's choice,
    made once per segment and band count: a saved plan replays it)."""
    _estimate(seg, bands)
    return seg.memo["loops"][bands][1]


def _estimate_with(seg: RowSegment, bands: int, remat: frozenset) -> tuple[int, LoopCost]:
    bounds = seg.bounds(bands)
    norm_key = {g: i for i, g in enumerate(seg.norms)}
    table = seg.shared.get("table")
    if table is None:
        table = seg.shared["table"] = node_costs(seg.input.graph.owning_module)
    ws, loop = 0, LoopCost()
    for j in _passes(seg):
        # A statistics pass runs the same program in every segment from this input whose GroupNorms at
        # its depth are the same: what it computes is upstream of them (same rows, dims and bytes).
        key = None if j == seg.num_passes - 1 else \
            ("pass", seg.input, seg.row_dim[seg.input], seg.length, bands, frozenset(seg.stats_targets(j)), remat)
        done = seg.shared.get(key) if key is not None else None
        if done is None:
            builder = _PassBuilder(seg, j, bounds, {}, norm_key, emit=False, remat=remat)
            first = builder.band(0)
            # the bands after the first reach their steady state in one period (a row of the coarsest nodes)
            window = min(len(bounds), 2 * seg.period(len(bounds)))
            steady = [ins for s in range(1, window) for ins in builder.band(s)]
            peak = simulate(first + steady)
            rest = (len(bounds) - 1) / max(window - 1, 1)  # later bands, in units of the simulated ones
            work = [table[n] for n in builder.order if n in table]
            for n, extra in builder.recomputed.items():  # rows above each later band, recomputed
                w = table.get(n)
                if w is not None and extra > 0:
                    f = extra * rest / seg.rows[n]
                    work.append(NodeCost(w.kind, int(w.flops * f), int(w.nbytes * f), w.op, int(w.out_bytes * f)))
            work += [NodeCost("norm", 0, tensor_bytes(val(g.args[0])), "statistics", tensor_bytes(val(g.args[0])))
                     for g in seg.stats_targets(j)]
            done = (peak, LoopCost(
                work=work,
                instructions=round(_instructions(first) + rest * _instructions(steady)),  # (a band: its instructions)
                copy_bytes=round(_copied(first) + rest * _copied(steady))
                + (sum(tensor_bytes(val(o)) for o in (seg.output, *seg.side_outputs)) if key is None else 0)))
            if key is not None:
                seg.shared[key] = done
        ws = max(ws, done[0])
        loop.work += done[1].work
        loop.instructions += done[1].instructions
        loop.copy_bytes += done[1].copy_bytes
    loop.piece = 1 / len(bounds)
    return ws, loop


def _instructions(program: list[tuple]) -> int:
    return sum(1 for ins in program if ins[0] != "free")


def _copied(program: list[tuple]) -> int:
    """Bytes a band's program copies: rows kept for the next band, joins, a band's statistics input."""
    total = 0
    for ins in program:
        if ins[0] == "op" and ins[2] in (ops.CLONE, torch.cat):
            total += ins[6]
        elif ins[0] == "stats":
            total += ins[4]
    return total


def _passes(seg: RowSegment) -> list[int]:
    return [j for j in range(seg.num_passes) if seg.stats_targets(j) or j == seg.num_passes - 1]


def build_programs(seg: RowSegment, bands: int) -> tuple[list[list[tuple]], list[torch.fx.Node]]:
    """One program per pass (its bands in order), and the whole inputs they index."""
    bounds = seg.bounds(bands)
    ext_index = {p: i for i, p in enumerate(seg.externals)}
    norm_key = {g: i for i, g in enumerate(seg.norms)}
    programs = []
    remat = recomputed(seg, bands)
    for j in _passes(seg):
        builder = _PassBuilder(seg, j, bounds, ext_index, norm_key, remat=remat)
        programs.append([ins for prog in builder.bands() for ins in prog])
    return programs, list(seg.externals)


# ----------------------------------------------------------------------------------------------------------------
# planning and outlining


@dataclass
class RowChoice:
    """A chosen segment and its band count, with the predicted workspace and seconds (``cost``)."""

    segment: RowSegment
    bands: int
    workspace_bytes: int
    cost: float

    @property
    def boundary_bytes(self) -> int:
        seg = self.segment
        return sum(tensor_bytes(val(n)) for n in (seg.input, seg.output, *seg.side_inputs, *seg.side_outputs))

    @property
    def bytes(self) -> int:
        return self.boundary_bytes + self.workspace_bytes


def _ladder(seg: RowSegment) -> list[int]:
    """Band counts to try, fewest first: the ladder up to one row of the coarsest nodes per band, then finer
    (:meth:`RowSegment.finer`: a few latent rows leave bands of many output rows)."""
    length = seg.length
    steps = [k for k in BAND_LADDER if k < length]
    if length > BAND_LADDER[-1]:
        return steps + [BAND_LADDER[-1]]
    return steps + [length] + [k for k in seg.finer() if k * seg.num_passes <= MAX_BAND_PROGRAMS]


def best_bands(seg: RowSegment, goal: int | None) -> RowChoice | None:
    """The fewest bands that keep the segment under ``goal`` bytes (None: the fewest bytes reachable)."""
    best = None
    for k in _ladder(seg):
        ws, cost = segment_estimate(seg, k)
        choice = RowChoice(seg, k, ws, cost)
        if goal is not None and choice.bytes <= goal:
            return choice
        gain = LADDER_GAIN if k <= seg.length else FINER_GAIN
        if best is not None and choice.bytes > best.bytes * (1 - gain):
            break  # more bands no longer pay (halos grow as bands shrink)
        if best is None or choice.bytes < best.bytes:
            best = choice
    return None if goal is not None else best


def chain(analysis: RowAnalysis, start: torch.fx.Node, cuts: list[torch.fx.Node], goal: int | None,
          slack: float = 0.02, floor: int = 0, end: torch.fx.Node | None = None) -> list[RowChoice] | None:
    """Segments from ``start`` to the graph's output through some of ``cuts``: each under ``goal`` bytes with
    the least predicted time (``goal`` None: the lowest reachable maximum or ``floor``, whichever is higher,
    within ``slack``, then the least time). Where no such chain exists from the first cut point, from there to
    the end as one segment past ``MAX_PASSES`` (CogVideoX's frame batches chain their GroupNorms and causal caches from the latent to
    the output: no cut splits them, one segment of 38 passes at full size)."""
    found = _chain(analysis, start, cuts, goal, slack, floor, end, whole=False)
    if found is None and cuts and start is cuts[0]:  # (from the first start only: each such segment is long)
        found = _chain(analysis, start, cuts, goal, slack, floor, end, whole=True)
    return found


def _chain(analysis: RowAnalysis, start: torch.fx.Node, cuts: list[torch.fx.Node], goal: int | None,
           slack: float, floor: int, end: torch.fx.Node | None, whole: bool) -> list[RowChoice] | None:
    end = analysis.graph_output if end is None else end
    points = [start] + [c for c in cuts if analysis.index[start] < analysis.index[c] < analysis.index[end]] + [end]
    points = list(dict.fromkeys(points))
    choices: dict[tuple[int, int], RowChoice | None] = {}

    def boundary(i: int, j: int) -> int:
        """A lower bound of any choice's bytes from ``points[i]`` to ``points[j]``: the two full-size tensors
        it reads and writes (``RowChoice.boundary_bytes``), known without building the segment."""
        return tensor_bytes(val(points[i])) + tensor_bytes(val(points[j]))

    def option(i: int, j: int, g: int | None) -> RowChoice | None:
        key = (i, j, g)
        if key not in choices:
            seg = analysis.segment(points[i], points[j], limit=not (whole and (i, j) == (0, len(points) - 1)))
            choices[key] = None if seg is None else best_bands(seg, g)
        return choices[key]

    if goal is None:
        # the lowest reachable maximum: a min-max path
        inf = float("inf")
        worst = [inf] * len(points)
        worst[0] = 0
        for j in range(1, len(points)):
            for i in range(j):
                if worst[i] == inf or max(worst[i], boundary(i, j)) >= worst[j]:
                    continue  # it cannot lower the maximum: no need to estimate it
                c = option(i, j, None)
                if c is not None:
                    worst[j] = min(worst[j], max(worst[i], c.bytes))
        if worst[-1] == inf:
            return None
        goal = int(max(worst[-1], floor) * (1 + slack))
    cost = [float("inf")] * len(points)
    prev: list[tuple[int, RowChoice] | None] = [None] * len(points)
    cost[0] = 0.0
    for j in range(1, len(points)):
        for i in range(j):
            if cost[i] == float("inf") or boundary(i, j) > goal:
                continue  # it cannot fit the goal
            c = option(i, j, goal)
            if c is not None and cost[i] + c.cost < cost[j]:
                cost[j], prev[j] = cost[i] + c.cost, (i, c)
    if prev[-1] is None:
        return None
    out, j = [], len(points) - 1
    while j:
        i, c = prev[j]
        out.append(c)
        j = i
    return out[::-1]


def choose_tail(analysis: RowAnalysis, prefix_peak, goal: int | None, slack: float = 0.02) -> list[RowChoice] | None:
    """Where the streamed tail starts and how it is cut.

    ``prefix_peak(c)`` is the activation peak the rest of the graph reaches before ``c`` (without streaming).
    With a ``goal`` (activation bytes), the start nearest the output whose prefix and segments fit (the least
    recomputation); without, the start with the lowest overall peak, ties (within ``slack``) going to the
    least predicted time.
    """
    region = analysis.region()
    if region is not None:
        c = best_bands(region, goal)
        if c is not None:
            return [c]
    cuts = analysis.cut_points()
    found = []
    for c0 in reversed(cuts):
        pf = prefix_peak(c0)
        if goal is not None:
            if pf > goal:
                continue
            ch = chain(analysis, c0, cuts, goal)
            if ch is not None:
                return ch
            continue
        ch = chain(analysis, c0, cuts, None, slack=slack, floor=pf)
        if ch is not None:
            found.append((max(pf, max(c.bytes for c in ch)), sum(c.cost for c in ch), ch))
    if not found:
        return None
    low = min(t for t, _, _ in found)
    return min((f for f in found if f[0] <= low * (1 + slack)), key=lambda f: f[1])[2]


def outline(gm: torch.fx.GraphModule, choices: list[RowChoice]) -> torch.fx.GraphModule:
    """Replace each chosen segment of ``gm`` (in place) by a ``call_module`` to a :class:`RowStream`."""
    from passes.slicing import stable_topological_sort

    graph = gm.graph
    built = [build_programs(c.segment, c.bands) for c in choices]
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # an earlier segment's output -> its call
    for c, (programs, externals) in zip(choices, built):
        seg = c.segment
        out = val(seg.output)
        name = "rows_" + "".join(ch if ch.isalnum() else "_" for ch in module_path(seg.nodes[0]) or seg.input.name)
        while hasattr(gm, name):
            name += "_"
        sides = tuple((tuple(val(o).shape), val(o).dtype, seg.row_dim[o]) for o in seg.side_outputs)
        slots = tuple((-1 - i, externals.index(p)) for i, p in enumerate(seg.side_inputs))
        module = RowStream(seg.name, programs, tuple(out.shape), out.dtype, seg.row_dim[seg.output],
                           seg.num_passes, c.bands, side_outputs=sides, sides=slots)
        gm.add_submodule(name, module)
        with graph.inserting_after(seg.output):
            call = graph.call_module(name, (replaced.get(seg.input, seg.input),
                                            *(replaced.get(p, p) for p in externals)))
        call.meta["val"] = (out, *(val(o) for o in seg.side_outputs)) if seg.side_outputs else out
        call.meta["nn_module_stack"] = seg.output.meta.get("nn_module_stack", {})
        info = node_info(call)
        info.group = f"rows:{seg.name}"
        # the programs that will run, simulated (the planner's trials simulated their first two bands)
        info.workspace_bytes = max((simulate(p) for p in programs), default=c.workspace_bytes)
        info.loop = segment_loop(seg, c.bands)
        if seg.side_outputs:
            items = []
            with graph.inserting_after(call):
                for k in reversed(range(1 + len(seg.side_outputs))):
                    item = graph.call_function(operator.getitem, (call, k))
                    item.meta["val"] = call.meta["val"][k]
                    item.meta["nn_module_stack"] = call.meta["nn_module_stack"]
                    items.insert(0, item)
            for o, item in zip((seg.output, *seg.side_outputs), items):
                o.replace_all_uses_with(item)
                replaced[o] = item
        else:
            seg.output.replace_all_uses_with(call)
            replaced[seg.output] = call
        for n in reversed(seg.nodes):
            graph.erase_node(n)
    stable_topological_sort(graph)
    graph.lint()
    gm.recompile()
    return gm


__all__ = ["RowAnalysis", "RowSegment", "RowChoice", "RowReq", "row_rule", "computed_rows", "simulate",
           "segment_estimate", "segment_loop", "build_programs", "chain", "choose_tail", "outline", "best_bands"]
