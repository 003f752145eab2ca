"""Operator grouping: connected node sets that are parallel along one shared slice axis.

Input: a captured ATen GraphModule with ``meta["val"]`` on every node.
Output: a list of :class:`OperatorGroup`, each a convex node set (outlining it creates no cycle) in which every
node's output carries the group's axis (a :class:`~passes.dims.SliceAxis`, or ``REDUCED`` for a reduction
combined across slices), with its boundary: the inputs it reads (sliced or whole) and the outputs it produces.

Method (the partitioner pattern of ``torch.fx.passes.infra.partitioner``): walk the graph in topological order;
a node joins the group of one of its producers when its dim rule maps its output axis onto exactly the axis
that producer carries, every other operand is available outside the group, and no cycle appears; otherwise it
starts a new group, whose axis is chosen by looking a little ahead for the axis that covers the most bytes
(ties go to the outermost dim). Ops without a rule are barriers and belong to no group.

First, ops parallel along a joint sequence are moved through the ``cat`` that joins it (``passes/joins.py``): the
video part of a text + video sequence becomes a chain of its own, sliced like any other; a join an attention reads
whole (its keys, its values) belongs to no group.

Then, so that groups hand each other as few full-size tensors as possible: GroupNorms that stop a group along
a dim they reduce over are split (``passes/reductions.py``; :func:`group_operators` works on a copy, its input
never changes) and the copy regrouped; a group whose statistics
pass feeds its own later nodes runs in several passes over the slices (``passes``); group tails that hand over
more bytes than they read are moved to the next group; a chain that only feeds a tensor its consumer reads
sliced, while that consumer reads others of the chain's group whole (an attention's queries, next to its keys
and values, or next to a join of them), moves into the consumer's group; a group that would hold one layer's inputs while it makes the
next layer's outputs is cut in two; small groups of cheap ops are absorbed into the group that consumes them;
and views handed out of a group are redone outside it, on their base. Last, a cheap chain (no anchor op) whose
result one group reads sliced from another group that needs it too is copied into the reader, which recomputes
it per slice from what it reads already (a transformer block's modulated norm, beside its query projection), and
the copy regrouped.
"""

from __future__ import annotations

import operator
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx

from passes import ops
from passes.dims import REDUCED, WHOLE, SliceAxis, SplitReduction, input_axes, shape, val
from passes.joins import WHOLE_JOIN, split_joins, whole_join
from passes.meta import aliases_input, module_path, node_storage, tensor_bytes
from passes.reductions import reduced_input_ok

# An axis with fewer positions than this never starts a group: it cannot cut a peak by more than half, and
# along the classifier-free-guidance batch (2) it would swallow the whole network into one group.
MIN_SEED_LENGTH = 4
# How many following nodes the seed look-ahead inspects (about one ResBlock or transformer block).
LOOKAHEAD_NODES = 48
# Axes whose look-ahead scores are this close count as tied; the outermost dim wins (contiguous slices).
TIE_TOLERANCE = 0.05
# A node that reads a complete reduction of its own group (GroupNorm statistics over the sliced axis) runs in a
# later pass over the slices, recomputing what it needs from the group's inputs instead of keeping a full-size
# tensor. Pass p recomputes passes 0..p-1, so cost grows quadratically: three passes let a temporal ResBlock
# (two such GroupNorms) run as one group with one extra convolution.
MAX_PASSES = 3
# Where one tensor crosses a group boundary, a node leaves its producer's group for a new one when another
# axis covers this many times the bytes in the look-ahead window.
SWITCH_FACTOR = 1.5
# A group is cut in two (see ``cut_long_groups``) only where the cut frees at least this fraction of the bytes it
# hands across: a cut adds a loop, and a full-size tensor between its parts.
CUT_GAIN = 0.25
# Rounds of moving group tails to the next group (each round regroups the graph; two settle the zoo models).
TAIL_ROUNDS = 3

_TEMPORAL_HINTS = ("temporal", "time_mixer", "motion_modules", "temp_")


@dataclass
class OperatorGroup:
    """A set of nodes that can run slice by slice along one axis of length ``length``."""

    name: str
    kind: str  # "spatial" (frames axis), "temporal" (pixel axis) or "other"
    length: int
    nodes: list[torch.fx.Node]
    axes: dict[torch.fx.Node, object]  # SliceAxis or REDUCED, per node
    inputs: dict[torch.fx.Node, object] = field(default_factory=dict)  # SliceAxis or WHOLE
    outputs: list[torch.fx.Node] = field(default_factory=list)
    passes: dict[torch.fx.Node, int] = field(default_factory=dict)  # which pass over the slices computes a node

    @property
    def num_passes(self) -> int:
        return 1 + max(self.passes.values(), default=0)

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def intermediate_bytes(self) -> int:
        return sum(tensor_bytes(val(n)) for n in self.nodes)


def _groupable(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or shape(node) is None or node.meta.get(WHOLE_JOIN):
        return False
    v = val(node)
    if isinstance(v, torch.Tensor):
        return v.dim() > 0
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in v)


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [x for x in node.all_input_nodes if isinstance(val(x), (torch.Tensor, list, tuple))]


def _is_list(node: torch.fx.Node) -> bool:
    """A node whose value is a list of tensors (split, chunk, unbind), read element by element with getitem."""
    return isinstance(val(node), (list, tuple))


def _spans(req: dict, length: int) -> bool:
    """Whether every input a rule slices spans the axis exactly (``length`` positions of its unit): a rule
    that maps an axis onto a dim of another size is wrong for that node, and taken as a barrier."""
    for p, r in req.items():
        if isinstance(r, SliceAxis):
            s = shape(p)
            if s is None or r.dim >= len(s) or s[r.dim] != length * r.unit:
                return False
    return True


def _reads_list_from_outside(req: dict, members) -> bool:
    """Whether a requirement reads a list-valued node that is not a member. A list never crosses a group
    boundary: its elements may differ in size along the split dim, so a getitem joins (or seeds) a group only
    with the op that made the list, and a list made inside a group is handed out through its getitems."""
    return any(_is_list(p) and p not in members for p in req)


class _Grouper:
    def __init__(self, gm: torch.fx.GraphModule, banned: set[tuple[str, str]] | None = None,
                 seeds: dict | None = None):
        self.gm = gm
        self.banned = banned or set()  # (node, seed of a group) pairs: the node may not join that group
        # look-ahead scores and seed axes: facts of the graph alone (a score looks only at nodes the walk has
        # not reached), shared by the walks over one unchanged graph
        self.seeds: dict = {} if seeds is None else seeds
        self.seed: dict[int, torch.fx.Node] = {}
        self.order = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.order)}
        self.group_of: dict[torch.fx.Node, int] = {}
        self.axis_of: dict[torch.fx.Node, object] = {}
        self.members: dict[int, list[torch.fx.Node]] = defaultdict(list)
        self.length: dict[int, int] = {}
        self.reqs: dict[int, dict[torch.fx.Node, object]] = defaultdict(dict)
        self.anc: dict[torch.fx.Node, int] = {}  # bitmask of groups among a node's ancestors
        self.pass_of: dict[torch.fx.Node, int] = {}
        # bitmask of the groups each group depends on, transitively, once groups are contracted to one call each
        self.group_deps: dict[int, int] = defaultdict(int)
        self.dependents: dict[int, int] = defaultdict(int)  # the reverse: the groups that depend on each group
        self.split_candidates: list[torch.fx.Node] = []

    # -- the join test ---------------------------------------------------------------------------------------
    def _options(self, node: torch.fx.Node, length: int) -> list[object]:
        s = shape(node)
        opts: list[object] = [SliceAxis(d, s[d] // length) for d in range(len(s)) if s[d] % length == 0 and s[d] >= length]
        if ops.of(node).combine is not None:
            opts.append(REDUCED)
        return opts

    def _fits(self, node, axis, members_axis, gid, reqs, length, check_cycles=True, passable_split=False):
        """The input requirements if ``node`` with output ``axis`` can join the group (of axis length
        ``length``), else None."""
        if axis is REDUCED:
            x = node.args[0]
            a = members_axis.get(x)
            if not isinstance(a, SliceAxis) or not reduced_input_ok(node, a):
                return None
            return {}
        try:
            req = input_axes(node, axis)
        except SplitReduction:
            if not passable_split:
                return None
            req = {node.args[0]: axis}
        if req is None or _reads_list_from_outside(req, members_axis):
            return None
        inside = False
        for p, r in req.items():
            if p in members_axis:
                if members_axis[p] is REDUCED and r is WHOLE:
                    if self._pass(node, members_axis) >= MAX_PASSES:
                        return None
                elif members_axis[p] != r:
                    return None
                inside = True
            else:
                if r is not WHOLE and not _spans({p: r}, length):
                    return None  # every sliced tensor of a group spans the group's axis exactly
                if reqs.get(p, r) != r:
                    return None
                if check_cycles and gid is not None and (self.anc.get(p, 0) >> gid) & 1:
                    return None
        if not inside and members_axis:
            return None
        # a rule that does not say how every tensor operand is read is incomplete: a barrier, not a guess
        for p in _tensor_inputs(node):
            if p not in req:
                return None
        return req

    def _switch_here(self, node: torch.fx.Node, axis: object, open_members: set[torch.fx.Node]) -> bool:
        """Whether ``node`` should start a new group instead of joining its producer's along ``axis``.

        Only where one tensor crosses from the group to the rest of the graph (every member still needed is
        an alias of what ``node`` reads), so leaving costs no extra boundary tensor; and only when another axis
        reaches far more of what follows (a block sliced along rows running into a spatial attention, whose
        keys must stay whole along rows but not along frames).
        """
        if _layout(node) or not isinstance(axis, SliceAxis):
            return False
        crossing = {node_storage(m) for m in open_members if self.axis_of[m] is not REDUCED}
        if not crossing or not crossing <= {node_storage(p) for p in node.all_input_nodes}:
            return False
        alone = self._best_seed(node)
        if alone is None or alone[2] or alone[0].dim == axis.dim:
            return False
        return alone[1] > SWITCH_FACTOR * self._score(node, axis)

    def _pass(self, node: torch.fx.Node, members_axis: dict) -> int:
        """The pass over the slices in which ``node`` can run: after every in-group reduction it reads."""
        return max(
            (self.pass_of.get(p, 0) + (members_axis[p] is REDUCED) for p in node.all_input_nodes if p in members_axis),
            default=0,
        )

    # -- seeding -----------------------------------------------------------------------------------------------
    def _score(self, seed: torch.fx.Node, axis: SliceAxis) -> float:
        """Bytes a group seeded here would cover in the next few nodes."""
        key = ("score", seed, axis)
        if key not in self.seeds:
            self.seeds[key] = self._look_ahead(seed, axis)
        return self.seeds[key]

    def _look_ahead(self, seed: torch.fx.Node, axis: SliceAxis) -> float:
        length = shape(seed)[axis.dim] // axis.unit
        members = {seed: axis}
        reqs: dict = {}
        covered = tensor_bytes(val(seed))
        start = self.index[seed]
        for node in self.order[start + 1 : start + 1 + LOOKAHEAD_NODES]:
            if not _groupable(node) or not any(p in members for p in node.all_input_nodes):
                continue
            for opt in self._options(node, length):
                req = self._fits(node, opt, members, None, reqs, length, check_cycles=False, passable_split=True)
                if req is not None:
                    members[node] = opt
                    for p, r in req.items():
                        if p not in members:
                            reqs[p] = r
                    covered += tensor_bytes(val(node))
                    break
        return float(covered)

    def _best_seed(self, node: torch.fx.Node) -> tuple[SliceAxis, float, bool] | None:
        """The axis a group seeded at ``node`` should take, its look-ahead score, and whether the node must
        first be split (a GroupNorm whose best axis is one it reduces over)."""
        key = ("seed", node)
        if key not in self.seeds:
            self.seeds[key] = self._seed_axis(node)
        return self.seeds[key]

    def _seed_axis(self, node: torch.fx.Node) -> tuple[SliceAxis, float, bool] | None:
        if _layout(node):
            # a layout op has nothing to slice; the first compute op after it picks the axis (a reshape that
            # merges (B, pixels) can only be cut along the wrong axis, frames, while its users can take pixels)
            return None
        s = shape(node)
        scored = []
        for d in range(len(s)):
            if s[d] < MIN_SEED_LENGTH:
                continue
            axis = SliceAxis(d, 1)
            try:
                req = input_axes(node, axis)
            except SplitReduction:
                req = SPLIT
            if req is None or req is not SPLIT and (_reads_list_from_outside(req, ())
                                                   or not _spans(req, s[d])):
                continue
            scored.append((self._score(node, axis), d, axis, req is SPLIT))
        if not scored:
            return None
        best = max(t[0] for t in scored)
        if best <= 0:
            return None
        for sc, _, axis, split in sorted(scored, key=lambda t: t[1]):
            if sc >= best * (1 - TIE_TOLERANCE):
                return axis, sc, split
        return None

    # -- the walk ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        next_gid = 0
        pending = {n: len(n.users) for n in self.order}  # users not yet visited
        open_members: dict[int, set[torch.fx.Node]] = defaultdict(set)  # members whose value is still needed
        for node in self.order:
            for p in node.all_input_nodes:
                pending[p] -= 1
                if pending[p] == 0 and p in self.group_of:
                    open_members[self.group_of[p]].discard(p)
            anc = 0
            for p in node.all_input_nodes:
                anc |= self.anc.get(p, 0)
                if p in self.group_of:
                    anc |= 1 << self.group_of[p]
            self.anc[node] = anc
            if not _groupable(node):
                continue
            joined = False
            producer_groups = sorted(
                {self.group_of[p] for p in node.all_input_nodes if p in self.group_of},
                key=lambda g: -sum(tensor_bytes(val(p)) for p in node.all_input_nodes if self.group_of.get(p) == g),
            )
            for gid in producer_groups:
                if (node.name, self.seed[gid].name) in self.banned:
                    continue
                if node.meta.get(RECOMPUTED) and not any(
                        p.meta.get(RECOMPUTED) for p in node.all_input_nodes if self.group_of.get(p) == gid):
                    continue  # a copy made for its reader's group: a group of its own, absorbed into the reader
                members_axis = {n: self.axis_of[n] for n in node.all_input_nodes if self.group_of.get(n) == gid}
                for opt in self._options(node, self.length[gid]):
                    try:
                        req = self._fits(node, opt, members_axis, gid, self.reqs[gid], self.length[gid])
                    except SplitReduction:
                        req = None
                    if req is None:
                        continue
                    if self._switch_here(node, opt, open_members[gid]):
                        break
                    if not self._acyclic_join(node, gid):
                        break
                    self._add(node, gid, opt, req)
                    if pending[node]:
                        open_members[gid].add(node)
                    joined = True
                    break
                if joined:
                    break
                if node.target is ops.GROUP_NORM:
                    x = node.args[0]
                    if self.group_of.get(x) == gid and isinstance(self.axis_of[x], SliceAxis) and self.axis_of[x].dim >= 2:
                        self.split_candidates.append(node)
            if joined:
                continue
            best = self._best_seed(node)
            if best is None:
                continue
            axis, _, needs_split = best
            if needs_split:
                self.split_candidates.append(node)
                continue
            req = input_axes(node, axis)
            gid = next_gid
            next_gid += 1
            self.seed[gid] = node
            self.length[gid] = shape(node)[axis.dim] // axis.unit
            self._add(node, gid, axis, req)
            if pending[node]:
                open_members[gid].add(node)

    def _acyclic_join(self, node: torch.fx.Node, gid: int) -> bool:
        """Whether ``node`` can join group ``gid`` without a cycle between groups. Each group stays convex by
        the outside-input test in :meth:`_fits`; this is the test between groups: ``node`` makes ``gid`` depend
        on every group it reads from, and none of them may already depend on ``gid`` (A feeds B through one
        member while B feeds A through another: each convex, a cycle once both are outlined)."""
        return not self.anc[node] & ~(1 << gid) & self.dependents[gid]

    def _depend(self, gid: int, deps: int) -> None:
        """Record that ``gid`` depends on the groups in ``deps`` (and on what they depend on), and so does every
        group that depends on ``gid``."""
        deps &= ~(1 << gid)
        if not deps & ~self.group_deps[gid]:  # known already (and so is what those depend on: it is closed)
            return
        closure, rest = deps, deps
        while rest:
            low = rest & -rest
            closure |= self.group_deps[low.bit_length() - 1]
            rest ^= low
        closure &= ~(1 << gid)
        if not closure & ~self.group_deps[gid]:
            return
        rest = self.dependents[gid] | (1 << gid)
        while rest:
            low = rest & -rest
            other = low.bit_length() - 1
            rest ^= low
            new = closure & ~self.group_deps[other] & ~low
            self.group_deps[other] |= new
            while new:
                bit = new & -new
                self.dependents[bit.bit_length() - 1] |= low
                new ^= bit

    def _add(self, node, gid, axis, req) -> None:
        self._depend(gid, self.anc[node])
        self.pass_of[node] = self._pass(node, {p: self.axis_of[p] for p in node.all_input_nodes if self.group_of.get(p) == gid})
        self.group_of[node] = gid
        self.axis_of[node] = axis
        self.members[gid].append(node)
        for p, r in req.items():
            if self.group_of.get(p) != gid:
                self.reqs[gid][p] = r

    # -- results -----------------------------------------------------------------------------------------------
    def _trim_trailing_views(self, nodes: list[torch.fx.Node]) -> list[torch.fx.Node]:
        """Drop views whose every user is outside the group: outside, they are free aliases of the group's
        output; inside, each would become an output buffer of its own (a second full-size copy)."""
        members = set(nodes)
        for node in reversed(nodes):
            if _layout(node) and aliases_input(node) and not any(u in members for u in node.users):
                members.discard(node)
        return [n for n in nodes if n in members]

    def tail_bans(self) -> set[tuple[str, str]]:
        """Tails to move out of their groups because the group would hand fewer bytes to the next one.

        Walking in topological order, a group grows as far as its axis allows, so it often ends a few cheap
        ops (a norm, an activation, a view) past the point where one tensor would cross to the next group, and
        hands over several full-size tensors instead. The tail is every node after the group's last anchor op
        (convolution, matmul, attention) that only feeds the tail or leaves the group; if the tensors the tail
        reads are smaller than the ones the group hands over, the tail is banned from the group and regrouped.
        """
        bans = set()
        for gid, nodes in self.members.items():
            members = set(nodes)
            outputs = [n for n in nodes if any(u not in members for u in n.users) and self.axis_of[n] is not REDUCED]
            tail: set[torch.fx.Node] = set()
            for n in reversed(nodes):
                if ops.of(n).anchor:
                    continue
                users_in = [u for u in n.users if u in members]
                if (n in outputs or users_in) and all(u in tail for u in users_in):
                    tail.add(n)
            if not tail:
                continue
            handed = {p for n in tail for p in n.all_input_nodes if p in members and p not in tail}
            handed |= {o for o in outputs if o not in tail}
            if _distinct_bytes(handed) < _distinct_bytes(outputs):
                bans |= {(n.name, self.seed[gid].name) for n in tail}
        return bans

    def move_exclusive_chains(self) -> None:
        """Chains that only feed a tensor another group reads sliced move into that group, when the same
        consumer reads other tensors of their group whole.

        An attention's queries, keys and values are all projected from one normed hidden state, so the walk puts
        the three projections in one group, which the attention cannot join (it reads the keys and values whole).
        The queries would then cross to the attention's group full-size, and every intermediate of their chain
        (projection, qk-norm, rotary embedding) would be full-size too. Moved, the chain runs slice by slice with
        the attention; its group hands over the hidden state the chain reads instead, which must not be larger.
        """
        for hid in sorted(self.members):
            by_group: dict[int, dict[str, list]] = defaultdict(lambda: {"sliced": [], "whole": []})
            for p, r in self.reqs[hid].items():
                gid = self.group_of.get(p)
                if gid is None and not isinstance(r, SliceAxis):
                    # keys or values joined outside any group (a joint sequence's): read whole from the groups
                    # that make their parts
                    for q in self._joined_from(p):
                        by_group[self.group_of[q]]["whole"].append(q)
                if gid is None or gid == hid or not any(self.group_of.get(u) == hid for u in p.users):
                    continue
                by_group[gid]["sliced" if isinstance(r, SliceAxis) else "whole"].append(p)
            for gid, read in sorted(by_group.items()):
                for out in read["sliced"]:
                    if self.group_of.get(out) == gid:
                        # beside keys and values read whole (or made chunk by chunk from what the attention
                        # reads: passes/keys.py), any chain that may move; otherwise only one that widens what it
                        # reads (a feed-forward's up-projection held across an attention)
                        keys = any(ops.of(u).family == "keys" for u in out.users)
                        self._move_cone(out, gid, hid, widening=not read["whole"] and not keys)

    def _joined_from(self, p: torch.fx.Node) -> list[torch.fx.Node]:
        """The group members a join no group takes (``WHOLE_JOIN``) is made of, through views, for ``p`` that
        is such a join or a view of one; else none."""
        join = whole_join(p)
        out = []
        for q in join.args[0] if join is not None else []:
            while q not in self.group_of and q.op == "call_function" and ops.of(q).alias is ops.Alias.VIEW:
                q = q.args[0]
            if q in self.group_of:
                out.append(q)
        return out

    def _move_cone(self, out: torch.fx.Node, gid: int, hid: int, widening: bool = False) -> None:
        g_members, h_members = set(self.members[gid]), set(self.members[hid])
        if any(u not in h_members for u in out.users):
            return
        cone = {out}
        for n in reversed(self.members[gid]):
            if n not in cone and n.users and all(u in cone for u in n.users):
                cone.add(n)
        if (len(cone) >= len(g_members) or self.seed[gid] in cone
                or any(self.axis_of[n] is REDUCED or self.pass_of.get(n, 0) for n in cone | h_members)):
            return
        nodes = [n for n in self.members[gid] if n in cone]
        # the chain's axes as the consumer reads it (the group may slice the same dim in other units: frames of
        # tokens where the consumer slices tokens)
        derived = self._rederive(nodes, cone, self.reqs[hid], self.length[hid])
        if derived is None:
            return
        axes, outside = derived
        if any(self.reqs[hid].get(p, r) != r for p, r in outside.items() if p not in cone):
            return
        handed = [p for p in outside if p in g_members]
        limit = _distinct_bytes([out]) - (1 if widening else 0)
        if not handed or _distinct_bytes(handed) > limit or not self._convex(cone | h_members):
            return
        for n in nodes:
            self.group_of[n] = hid
            self.axis_of[n] = axes[n]
        self.members[gid] = [n for n in self.members[gid] if n not in cone]
        self.members[hid] = [n for n in self.order if n in cone or n in h_members]
        self.reqs[hid].update(outside)
        self.reqs[hid].pop(out, None)

    def cut_long_groups(self) -> None:
        """Groups cut in two where one would otherwise hold two layers' tensors at once.

        A sliced group holds every tensor it reads from outside and every output it preallocates for as long
        as its loop runs. A group that runs from one attention (whose keys and values it reads whole) into the
        next layer's key and value projections (which it hands out whole) holds both layers' at once, where
        eager holds one layer's at a time. Cut where ``crossing`` bytes pass from its first part to the rest,
        the group frees, at its peak, the lesser of the inputs that die in the first part and the outputs made
        in the rest; the cut that frees the most, net of the crossing (and at least ``CUT_GAIN`` of it), is made,
        and the rest cut again. Weights and graph inputs never die. Each part of
        a convex group, in topological order, is convex, and no cycle between groups appears.
        """
        readers: dict[object, set[torch.fx.Node]] = defaultdict(set)
        for n in self.order:
            readers[node_storage(n)].update(n.users)
        work = sorted(self.members)
        while work:
            gid = work.pop(0)
            nodes = self.members[gid]
            if len(nodes) < 2 or any(self.pass_of.get(n, 0) for n in nodes):
                continue
            members = set(nodes)
            position = {n: i for i, n in enumerate(nodes)}
            inputs = {p for p in self.reqs[gid] if p not in members and any(u in members for u in p.users)}
            input_storages = {node_storage(p) for p in inputs}
            inputs = {p for p in inputs if p.op == "call_function"}  # weights and graph inputs never die here
            end = self.index[nodes[-1]]
            last_read = {}  # the member position that last reads each input's storage (None: read after the group)
            for p in inputs:
                users = readers[node_storage(p)]
                last_read[p] = (None if any(u not in members and self.index[u] > end for u in users)
                                else max((position[u] for u in users if u in members), default=None))
            outputs = [n for n in nodes if any(u not in members for u in n.users) and self.axis_of[n] is not REDUCED
                       and node_storage(n) not in input_storages]
            best, cut_at = 0, None
            for i in range(1, len(nodes)):
                if ops.of(nodes[i]).layout:
                    continue
                crossing = {p for n in nodes[i:] for p in n.all_input_nodes if p in members and position[p] < i}
                if not crossing or any(self.axis_of[p] is REDUCED or _is_list(p) for p in crossing):
                    continue
                dying = [p for p, last in last_read.items() if last is not None and last < i]
                made = [o for o in outputs if position[o] >= i]
                gain = min(_distinct_bytes(dying), _distinct_bytes(made)) - _distinct_bytes(crossing)
                # ties go to the later cut: it frees more inputs, and keeps a chain like the queries' in one part
                if gain >= best and gain > 0 and gain >= CUT_GAIN * _distinct_bytes(crossing):
                    best, cut_at = gain, i
            if cut_at is None:
                continue
            rest = nodes[cut_at:]
            new = max(self.members) + 1
            self.members[gid] = nodes[:cut_at]
            self.members[new] = rest
            self.seed[new] = rest[0]
            self.length[new] = self.length[gid]
            self.reqs[new] = dict(self.reqs[gid])
            for n in rest:
                self.group_of[n] = new
                for p in n.all_input_nodes:
                    if p in members and position[p] < cut_at:
                        self.reqs[new][p] = self.axis_of[p]
            work.append(new)

    def absorb_cheap_groups(self) -> None:
        """Merge a group without anchor ops into the one group that consumes all it produces, re-slicing it
        along that group's axis where the dim rules allow.

        Such a group is a few pointwise ops on values from outside (``alpha * x_spatial`` in SVD's
        AlphaBlender) that the walk met before it met its consumer, and seeded along another axis; on its own
        it hands a full-size tensor to its consumer.
        """
        for gid in sorted(self.members):
            nodes = self.members[gid]
            if not nodes or any(ops.of(n).anchor for n in nodes):
                continue
            members = set(nodes)
            consumers = {self.group_of.get(u) for n in nodes for u in n.users if u not in members}
            if len(consumers) != 1 or None in consumers:
                continue
            (target,) = consumers
            if self.length.get(target) is None:
                continue
            derived = self._rederive(nodes, members, self.reqs[target], self.length[target])
            if derived is None:
                continue
            axes, outside = derived
            if any(self.reqs[target].get(p, r) != r for p, r in outside.items()):
                continue
            if not self._convex(members | set(self.members[target])):
                continue
            for n in nodes:
                self.group_of[n] = target
                self.axis_of[n] = axes[n]
                self.pass_of[n] = 0
            merged = self.members[target] + nodes
            self.members[target] = [n for n in self.order if n in set(merged)]
            self.members[gid] = []
            self.reqs[target].update(outside)
            for n in nodes:
                self.reqs[target].pop(n, None)

    def _convex(self, merged: set[torch.fx.Node]) -> bool:
        """Whether ``merged`` (the union of groups about to merge) can be outlined as one call: no path leaves
        it and comes back, through outside nodes or through other groups (each runs as one call, so reaching
        any member of one reaches the users of all its members). Each group is convex when the walk builds it;
        two of them merged need not be. Paths that come back end before ``merged``'s last node, which bounds
        the search."""
        last = max(self.index[n] for n in merged)
        stack = [u for n in merged for u in n.users if u not in merged]
        seen: set[torch.fx.Node] = set()
        while stack:
            x = stack.pop()
            if x in seen or self.index.get(x, last + 1) > last:
                continue
            seen.add(x)
            gid = self.group_of.get(x)
            for y in [x] if gid is None else self.members[gid]:
                for u in y.users:
                    if u in merged:
                        return False
                    stack.append(u)
        return True

    def _rederive(self, nodes, members, consumer_reqs, length) -> tuple[dict, dict] | None:
        """Axes for ``nodes`` such that every value the consumer group reads is sliced as it reads it, and
        what they then need from outside."""
        axes: dict = {}
        outside: dict = {}
        for n in reversed(nodes):
            wanted = consumer_reqs.get(n) if any(u not in members for u in n.users) else None
            for u in n.users:
                if u in members:
                    a = axes.get(("in", u, n))
                    if a is not None and wanted not in (None, a):
                        return None
                    wanted = wanted or a
            if not isinstance(wanted, SliceAxis):
                return None
            try:
                req = input_axes(n, wanted)
            except SplitReduction:
                return None
            if req is None or any(p not in req for p in _tensor_inputs(n)):
                return None
            axes[n] = wanted
            for p, r in req.items():
                if p in members:
                    if r is WHOLE:
                        return None
                    axes[("in", n, p)] = r
                elif outside.get(p, r) != r or _is_list(p) or not _spans({p: r}, length):
                    return None
                else:
                    outside[p] = r
        return {n: axes[n] for n in nodes}, outside

    def _hoist_view_outputs(self, nodes: list[torch.fx.Node]) -> None:
        """A view that the group both uses and hands out is handed out as a view made outside the group, of its
        base. Otherwise the loop would fill a buffer for the view and another for its base: two full-size
        tensors where eager has one storage."""
        members = set(nodes)
        for node in nodes:
            outside = [u for u in node.users if u not in members]
            base = node.args[0] if node.args else None
            if (not outside or not _layout(node) or not aliases_input(node)
                    or base not in members or not any(u in members for u in node.users)):
                continue
            chain = [node]  # the views between the handed-out value and its base, redone outside
            while base in members and _layout(base) and aliases_input(base):
                chain.append(base)
                base = base.args[0]
            copy, anchor = base, node
            for view in reversed(chain):
                with self.gm.graph.inserting_after(anchor):
                    copy = self.gm.graph.call_function(view.target, (copy, *view.args[1:]), view.kwargs)
                copy.meta = dict(view.meta)
                anchor = copy
            for u in outside:
                u.replace_input_with(node, copy)
                reqs = self.reqs.get(self.group_of.get(u))
                if reqs is not None and node in reqs and not self.members.get(self.group_of[u]) == nodes:
                    reqs[copy] = reqs[node]

    def _adopt_list_items(self, gid: int, nodes: list[torch.fx.Node]) -> list[torch.fx.Node]:
        """The getitems of the group's lists that were left outside (a tail ban, a switch of axis) join it: a
        group hands out tensors, never a list. Each element carries the list's axis (the getitem rule), and a
        getitem depends on its list alone, so the group stays convex."""
        members = set(nodes)
        for n in nodes:
            if _is_list(n):
                for u in n.users:
                    if u not in members and u.target is operator.getitem and u not in self.group_of:
                        self.group_of[u] = gid
                        self.axis_of[u] = self.axis_of[n]
                        self.pass_of[u] = self.pass_of[n]
                        members.add(u)
        return [n for n in self.gm.graph.nodes if n in members]

    def groups(self) -> list[OperatorGroup]:
        self.move_exclusive_chains()
        self.cut_long_groups()
        self.absorb_cheap_groups()
        for gid in sorted(self.members):
            self.members[gid] = self._adopt_list_items(gid, self.members[gid])
        # every group's views are hoisted before any group's inputs are listed: a hoisted view is a new input of
        # the groups that read it, whichever order they come in
        for gid in sorted(self.members):
            self._hoist_view_outputs(self.members[gid])
        result = []
        for gid, nodes in sorted(self.members.items()):
            nodes = self._trim_trailing_views(nodes)
            if not nodes:
                continue
            if not any(n.target is not ops.VIEW for n in nodes):
                continue
            members = set(nodes)
            outputs = [n for n in nodes if any(u not in members for u in n.users)]
            inputs = {p: r for p, r in self.reqs[gid].items()
                      if p not in members and any(u in members for u in p.users)}
            # every outside tensor a member reads must be a declared input
            result.append(
                OperatorGroup(
                    name=_group_name(nodes),
                    kind=_group_kind(nodes, {n: self.axis_of[n] for n in nodes}),
                    length=self.length[gid],
                    nodes=nodes,
                    axes={n: self.axis_of[n] for n in nodes},
                    inputs=inputs,
                    outputs=outputs,
                    passes={n: self.pass_of[n] for n in nodes},
                )
            )
        result = _dissolve_cycles(self.gm, result)
        _dedupe_names(result)
        return result


def _distinct_bytes(nodes) -> int:
    """Bytes of the storages behind ``nodes``: views of one tensor counted once, as the largest of them."""
    storages: dict[object, int] = {}
    for n in nodes:
        v = val(n)
        if isinstance(v, torch.Tensor):
            key = node_storage(n)
            storages[key] = max(storages.get(key, 0), tensor_bytes(v))
    return sum(storages.values())


def _layout(node: torch.fx.Node) -> bool:
    return ops.of(node).layout


SPLIT = object()  # a seed axis that needs the node split first (see passes/reductions.py)


def _dissolve_cycles(gm: torch.fx.GraphModule, groups: list[OperatorGroup]) -> list[OperatorGroup]:
    """Groups that, outlined together, would form a cycle (A feeds B through outside nodes and B feeds A) are
    dissolved, smallest first, until none does: a dissolved group runs whole, which is exact. The walk and its
    merges keep groups convex; this is the check that nothing let a cycle through."""
    import networkx as nx

    groups = list(groups)
    while True:
        owner = {n: i for i, g in enumerate(groups) for n in g.nodes}
        succ: dict = defaultdict(set)
        for n in gm.graph.nodes:
            a = owner.get(n, n)
            for u in n.users:
                b = owner.get(u, u)
                if a != b:
                    succ[a].add(b)
        if _acyclic(succ):  # the usual case, in linear time (networkx takes seconds on a full-size UNet)
            return groups
        cycle = nx.find_cycle(nx.DiGraph([(a, b) for a, bs in succ.items() for b in bs]))
        involved = {x for edge in cycle for x in edge[:2] if isinstance(x, int)}
        drop = min(involved, key=lambda i: groups[i].intermediate_bytes())
        groups = [g for i, g in enumerate(groups) if i != drop]


def _acyclic(succ: dict) -> bool:
    """Whether the directed graph ``succ`` (vertex -> successors) has no cycle (Kahn's algorithm)."""
    indegree: dict = defaultdict(int)
    for bs in succ.values():
        for b in bs:
            indegree[b] += 1
    ready = [v for v in succ if not indegree[v]]
    seen = 0
    while ready:
        v = ready.pop()
        seen += 1
        for b in succ.get(v, ()):
            indegree[b] -= 1
            if not indegree[b]:
                ready.append(b)
    return seen == len(set(succ) | set(indegree))


def _group_name(nodes: list[torch.fx.Node]) -> str:
    paths = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not paths:
        return nodes[0].name
    common = os.path.commonprefix(paths)
    if common:
        return ".".join(common)
    # no common module: name by the module holding most of the group's bytes
    by_path: dict[str, int] = defaultdict(int)
    for n in nodes:
        by_path[module_path(n)] += tensor_bytes(val(n))
    return max(by_path, key=by_path.get) or nodes[0].name


def _group_kind(nodes: list[torch.fx.Node], axes: dict) -> str:
    weight = defaultdict(int)
    for n in nodes:
        # module names, not classes: the root class of every video UNet says "SpatioTemporal"
        kind = "temporal" if any(h in module_path(n).lower() for h in _TEMPORAL_HINTS) else "spatial"
        weight[kind] += tensor_bytes(val(n))
    if not weight:
        return "other"
    kind = max(weight, key=weight.get)
    if kind == "spatial" and not any(isinstance(a, SliceAxis) and a.dim == 0 for a in axes.values()):
        return "other"
    return kind


def _dedupe_names(groups: list[OperatorGroup]) -> None:
    seen: dict[str, int] = defaultdict(int)
    for g in groups:
        seen[g.name] += 1
    count: dict[str, int] = defaultdict(int)
    for g in groups:
        if seen[g.name] > 1:
            count[g.name] += 1
            g.name = f"{g.name}#{count[g.name]}"


class Grouping(NamedTuple):
    """What :func:`group_operators` returns: the graph the groups are made of (a copy of the input, rewritten),
    its groups, and the names of the GroupNorms split."""

    graph_module: torch.fx.GraphModule
    groups: list[OperatorGroup]
    split: list[str]


def group_operators(gm: torch.fx.GraphModule) -> Grouping:
    """Operator grouping, on a copy of ``gm`` (``gm`` itself is never changed) with its rewrites: per-token ops
    are moved through the joins of a joint sequence first (``passes/joins.py``); GroupNorms that stop a group
    along one of their reduced dims are split into exact statistics + apply form (``passes/reductions.py``) and
    the copy grouped again; views a group hands out are redone outside it, on their base."""
    from passes.reductions import split_group_norms
    from passes.slicing import copy_graph_module

    work = copy_graph_module(gm)[0]
    split_joins(work)
    seeds: dict = {}
    first = _Grouper(work, seeds=seeds)
    first.run()
    names: list[str] = []
    if not first.split_candidates:
        groups = _walk(work, first, seeds)
    else:
        norms = list(dict.fromkeys(first.split_candidates))
        names = [n.name for n in norms]
        split_group_norms(work, norms)
        groups = _walk(work, None, {})
    if _recompute_cheap_inputs(work, groups):
        groups = _walk(work, None, {})
    return Grouping(work, groups, names)


# A chain of cheap ops (no anchor) of at most this many nodes may be recomputed in a group that reads its result.
MAX_RECOMPUTED_NODES = 12
# Marks such a copy made for an attention's group that reads joined keys and values (passes/joins.py): the walk
# never adds it to the group of what it reads (the group it was copied from, where it would be computed whole
# again: HunyuanVideo's single-stream blocks) but to its own, which absorb_cheap_groups merges into its reader.
# Elsewhere the walk places copies as it finds them (LTX-Video's minimum is lower so).
RECOMPUTED = "fxstream_recomputed"


def _recompute_cheap_inputs(gm: torch.fx.GraphModule, groups: list[OperatorGroup]) -> bool:
    """Give a group its own copy of a cheap chain whose result it reads sliced from another group that needs the
    result too, when the chain reads nothing full-size the group does not read already (same axis).

    A transformer block's modulated norm feeds the key and value projections (one group: the attention reads
    them whole) and the query projection (the attention's group): the normed hidden state would cross between
    the two full-size, beside the hidden state both read. Recomputed per slice in the attention's group (a norm
    and a multiply-add, next to the projections), it stays inside the first group. Returns whether the graph
    changed (the caller groups it again)."""
    group_of = {n: g for g in groups for n in g.nodes}
    changed = False
    for h in groups:
        members_h = set(h.nodes)
        for p, axis in list(h.inputs.items()):
            g = group_of.get(p)
            if not isinstance(axis, SliceAxis) or g is None or g is h:
                continue
            members_g = set(g.nodes)
            if not any(u in members_g for u in p.users):
                continue  # p leaves g only for h: nothing is saved
            if any(u not in members_g and u not in members_h for u in p.users):
                continue  # read by a third group too: it stays full-size whatever h does
            cone, stack = set(), [p]
            while stack:
                n = stack.pop()
                if n in cone:
                    continue
                cone.add(n)
                # back to what h reads already, sliced (the hidden state beside the normed one)
                stack.extend(x for x in n.all_input_nodes if x in members_g and not isinstance(h.inputs.get(x), SliceAxis))
            if (len(cone) > MAX_RECOMPUTED_NODES or any(ops.of(n).anchor or _is_list(n) for n in cone)
                    or any(g.axes[n] is REDUCED or g.passes.get(n, 0) for n in cone)):
                continue
            small = tensor_bytes(val(p)) // 8
            outside = {x for n in cone for x in n.all_input_nodes if x not in cone}
            if any(tensor_bytes(val(x)) > small and not isinstance(h.inputs.get(x), SliceAxis) for x in outside):
                continue
            users = [u for u in p.users if u in members_h]
            joint = _reads_whole_join(h)
            mapping: dict[torch.fx.Node, torch.fx.Node] = {}
            with gm.graph.inserting_before(_earliest(gm, users)):
                for n in [n for n in g.nodes if n in cone]:
                    copy = gm.graph.node_copy(n, lambda x: mapping.get(x, x))
                    copy.meta = dict(n.meta)
                    if joint:
                        copy.meta[RECOMPUTED] = True
                    mapping[n] = copy
            for u in users:
                u.replace_input_with(p, mapping[p])
            changed = True
    if changed:
        gm.recompile()
    return changed


def _reads_whole_join(group: OperatorGroup) -> bool:
    """Whether ``group`` reads, whole, keys or values joined outside any group (``WHOLE_JOIN``), through views."""
    return any(axis is WHOLE and whole_join(p) is not None for p, axis in group.inputs.items())


def _earliest(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> torch.fx.Node:
    wanted = set(nodes)
    return next(n for n in gm.graph.nodes if n in wanted)


def _walk(gm: torch.fx.GraphModule, grouper: _Grouper | None, seeds: dict) -> list[OperatorGroup]:
    """The walk (unless ``grouper`` already made it), then the tail rounds: a node that made a group end in a
    small tail is banned from it and the graph walked again (``seeds``: the look-ahead facts they share)."""
    if grouper is None:
        grouper = _Grouper(gm, seeds=seeds)
        grouper.run()
    banned: set[tuple[str, str]] = set()
    for _ in range(TAIL_ROUNDS):
        # tails are judged on the groups as they will be: queries moved to their attention, long groups cut
        grouper.move_exclusive_chains()
        grouper.cut_long_groups()
        new = grouper.tail_bans() - banned
        if not new:
            break
        banned |= new
        grouper = _Grouper(gm, banned, seeds=seeds)
        grouper.run()
    return grouper.groups()


__all__ = ["OperatorGroup", "Grouping", "group_operators", "REDUCED", "WHOLE"]
