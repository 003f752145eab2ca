"""Step Rehash, graph side: cache points, the partial graph that starts from a cached feature, FLOP counts.

On a rehash step the network reuses a feature ``c`` cached at the last full step and computes only what
follows it. For a cache point ``c`` (a node of the captured graph):

* the *full* graph is the captured graph plus one ``store`` call at its end that hands ``c`` to the cache
  (so ``c`` stays alive to the end of the step, as it does at run time: the memory analysis sees it);
* the *partial* graph is the captured graph with ``c`` replaced by a ``load`` of the cached value, then every
  node that no longer feeds the output removed: everything that only fed ``c`` (encoder, mid block, most of
  the decoder) is gone; what feeds both ``c`` and later nodes (the time embedding, skip connections the rest
  of the decoder reads) stays. It ends with the same ``store`` of the loaded value, so that the value counts
  as live for the whole step.

Both graphs keep the captured graph's signature (the same placeholders, in the same order, and the same
output structure), so they are called exactly like the module. ``store`` and ``load`` are ``call_module`` nodes
to :class:`RehashStore` / :class:`RehashLoad`, which share one :class:`FeatureCache`.

Cache points are named by module path: a candidate is the output of a temporal layer in the decoder half
(``up_blocks.*``), found through ``nn_module_stack``; :func:`candidates` lists them with the fraction of the
graph's FLOPs a rehash step skips. :func:`deepcache_point` is the input of the last up block, where
DeepCache-style caching cuts (the shallow branch is recomputed).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from fxstream.runtime.rehash import FeatureCache, RehashLoad, RehashStore
from passes import timing

# Classes whose outputs are temporal layers' outputs (diffusers 0.3x-0.4x names).
TEMPORAL_LAYERS = (
    "SpatioTemporalResBlock",  # SVD: spatial resnet, temporal resnet, learned blend
    "TransformerSpatioTemporalModel",  # SVD: spatial and temporal transformer, learned blend
    "AnimateDiffTransformer3D",  # AnimateDiff motion module
    "TransformerTemporalModel",  # AnimateDiff motion module (older diffusers), UNet3D temp_attentions
    "TemporalConvLayer",  # UNet3D temp_convs
)
DECODER_PREFIX = "up_blocks."
# Calibration tries every layer of this many up blocks, counted from the last: the cuts that skip most of the
# network; a cut in an earlier up block recomputes most of the decoder on every step and saves little.
LAYER_BLOCKS = 2

STORE_NAME = "fx_rehash_store"
LOAD_NAME = "fx_rehash_load"


# ------------------------------------------------------------------------------------------------ cache points


@dataclass(frozen=True)
class CachePoint:
    """A candidate: the output node of the module at ``path``, and the FLOPs with and without caching it."""

    path: str
    module_class: str
    node: str  # the node's name in the captured graph
    flops_full: int  # one call of the full graph
    flops_partial: int  # one call of the partial graph (a rehash step)
    nbytes: int  # the cached feature's size

    @property
    def skipped_fraction(self) -> float:
        """Fraction of the full graph's FLOPs a rehash step skips."""
        return 1.0 - self.flops_partial / self.flops_full if self.flops_full else 0.0

    def flops_saved(self, steps: int, full_steps: int) -> float:
        """FLOPs of ``steps`` full calls over those of ``full_steps`` full calls and the rest rehash steps."""
        return steps * self.flops_full / (full_steps * self.flops_full + (steps - full_steps) * self.flops_partial)


def _stack_paths(node: torch.fx.Node) -> list[tuple[str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        out.append((path, name.rsplit(".", 1)[-1]))
    return out


def _in_scope(node: torch.fx.Node, path: str) -> bool:
    return any(p == path for p, _ in _stack_paths(node))


def module_output(gm: torch.fx.GraphModule, path: str) -> torch.fx.Node:
    """The node whose value is the output of the submodule at ``path``: the one tensor computed inside the
    module's scope that is used outside it.

    Raises:
        ValueError: when the module does not appear in the graph or does not have exactly one tensor output.
    """
    inside = [n for n in gm.graph.nodes if n.op == "call_function" and _in_scope(n, path)]
    if not inside:
        raise ValueError(f"no operation of module {path!r} in the graph")
    members = set(inside)
    outs = [
        n for n in inside
        if isinstance(n.meta.get("val"), torch.Tensor) and any(u not in members for u in n.users)
    ]
    if len(outs) != 1:
        raise ValueError(f"module {path!r} has {len(outs)} tensor outputs used outside it; a cache point needs 1")
    return outs[0]


def _temporal_modules(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """(path, class) of the temporal layers in the decoder half, in graph order."""
    seen: dict[str, str] = {}
    for n in gm.graph.nodes:
        for path, cls in _stack_paths(n):
            if path.startswith(DECODER_PREFIX) and cls in TEMPORAL_LAYERS and path not in seen:
                seen[path] = cls
    return list(seen.items())


def candidates(gm: torch.fx.GraphModule) -> list[CachePoint]:
    """The candidate cache points of a captured UNet, in graph order, with the FLOPs a rehash step skips."""
    out = []
    for path, cls in _temporal_modules(gm):
        try:
            out.append(_point_at(gm, path, cls))
        except ValueError:  # not a single-output module
            continue
    return out


def _point_at(gm: torch.fx.GraphModule, path: str, cls: str | None = None) -> CachePoint:
    """The cache point at the output of the module at ``path`` (any module with one tensor output)."""
    node = module_output(gm, path)
    if cls is None:
        cls = next(c for n in gm.graph.nodes for p, c in _stack_paths(n) if p == path)
    val = node.meta["val"]
    return CachePoint(path, cls, node.name, graph_flops(gm), graph_flops(gm, nodes=kept_nodes(gm, node)),
                      val.numel() * val.element_size())


def layer_candidates(gm: torch.fx.GraphModule, blocks: int = LAYER_BLOCKS) -> list[CachePoint]:
    """Every layer of the decoder's last ``blocks`` up blocks as a cache point (``up_blocks.K.<kind>.<i>``:
    resnets, attentions, temporal layers, upsamplers, whatever the block holds), and the DeepCache-style cut,
    in graph order; one point per node (an up block's upsampler and the block share their output: the block's
    path, the DeepCache cut, names it).
    Layers without exactly one tensor output are left out."""
    ups = up_block_paths(gm)
    wanted = set(ups[-blocks:])
    layers: dict[str, None] = {}
    for n in gm.graph.nodes:
        for path, _ in _stack_paths(n):
            parts = path.split(".")
            if len(parts) == 4 and ".".join(parts[:2]) in wanted:
                layers.setdefault(path)
    found: dict[str, CachePoint] = {}
    if len(ups) >= 2:  # first: a layer with the same output is named as the DeepCache cut
        deep = deepcache_point(gm)
        found[deep.node] = deep
    for path in layers:
        try:
            point = _point_at(gm, path)
        except ValueError:  # not a single-output module
            continue
        found.setdefault(point.node, point)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(found.values(), key=lambda c: order[c.node])


def up_block_paths(gm: torch.fx.GraphModule) -> list[str]:
    paths = {p for n in gm.graph.nodes for p, _ in _stack_paths(n)}
    blocks = sorted({p for p in paths if p.startswith(DECODER_PREFIX) and p.count(".") == 1},
                    key=lambda p: int(p.split(".")[1]))
    return blocks


def deepcache_point(gm: torch.fx.GraphModule) -> CachePoint:
    """DeepCache-style cut: the input of the last up block (the output of the one before it)."""
    blocks = up_block_paths(gm)
    if len(blocks) < 2:
        raise ValueError("DeepCache-style caching needs at least two up blocks")
    return _point_at(gm, blocks[-2])


def resolve(gm: torch.fx.GraphModule, cache_point: str) -> CachePoint:
    """A cache point by module path (any module with one tensor output, temporal or not), or ``"deepcache"``
    for :func:`deepcache_point`, or ``"auto"`` for the candidate that skips the most FLOPs."""
    if cache_point == "deepcache":
        return deepcache_point(gm)
    if cache_point == "auto":
        found = candidates(gm)
        if not found:
            raise ValueError("no temporal layer in the decoder half to cache; name a cache point by module path")
        return max(found, key=lambda c: (c.skipped_fraction, -c.nbytes))
    return _point_at(gm, cache_point)


# ------------------------------------------------------------------------------------------------ partial graph


def kept_nodes(gm: torch.fx.GraphModule, cache: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes a rehash step still runs: ancestors of the output, not crossing ``cache`` (which is loaded,
    not computed, so it is not among them)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    kept: set[torch.fx.Node] = set()
    stack = [output]
    while stack:
        n = stack.pop()
        if n in kept or n is cache:
            continue
        kept.add(n)
        stack.extend(n.all_input_nodes)
    return kept


def _fresh_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph that shares its parameters and submodules."""
    with warnings.catch_warnings():  # torch's pytree codegen copies with a deprecated isinstance check
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    new = torch.fx.GraphModule(gm, graph)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def _output_node(graph: torch.fx.Graph) -> torch.fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _node_named(graph: torch.fx.Graph, name: str) -> torch.fx.Node:
    for n in graph.nodes:
        if n.name == name:
            return n
    raise ValueError(f"no node {name!r} in the graph")


def full_graph(gm: torch.fx.GraphModule, cache_node: str, cache: FeatureCache) -> torch.fx.GraphModule:
    """``gm`` (copied) with ``store(c)`` at its end."""
    return storing_graph(gm, {cache_node: cache})


def storing_graph(gm: torch.fx.GraphModule, caches: dict[str, FeatureCache]) -> torch.fx.GraphModule:
    """``gm`` (copied) with a ``store`` at its end for each node named in ``caches`` (into its cache): one full
    call hands every candidate's value to calibration."""
    new = _fresh_copy(gm)
    graph = new.graph
    for i, (cache_node, cache) in enumerate(caches.items()):
        name = STORE_NAME if i == 0 else f"{STORE_NAME}_{i}"
        new.add_submodule(name, RehashStore(cache))
        c = _node_named(graph, cache_node)
        with graph.inserting_before(_output_node(graph)):
            store = graph.call_module(name, (c,))
        store.meta["val"] = None
        store.meta["nn_module_stack"] = dict(c.meta.get("nn_module_stack") or {})
    graph.lint()
    new.recompile()
    return new


def partial_graph(gm: torch.fx.GraphModule, cache_node: str, cache: FeatureCache) -> torch.fx.GraphModule:
    """``gm`` (copied) with ``c`` loaded from the cache and what only fed it removed; ends with ``store``."""
    new = _fresh_copy(gm)
    graph = new.graph
    new.add_submodule(LOAD_NAME, RehashLoad(cache))
    new.add_submodule(STORE_NAME, RehashStore(cache))
    c = _node_named(graph, cache_node)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        load = graph.call_module(LOAD_NAME, ())
    load.meta["val"] = c.meta["val"]
    load.meta["nn_module_stack"] = dict(c.meta.get("nn_module_stack") or {})
    c.replace_all_uses_with(load)
    with graph.inserting_before(_output_node(graph)):
        store = graph.call_module(STORE_NAME, (load,))
    store.meta["val"] = None
    _remove_dead(graph)
    graph.lint()
    new.delete_all_unused_submodules()
    new.recompile()
    return new


def _remove_dead(graph: torch.fx.Graph) -> None:
    """Erase every call/attribute node whose value nobody uses (placeholders, the output and ``store`` stay)."""
    for n in reversed(list(graph.nodes)):
        if n.op in ("placeholder", "output") or n.users:
            continue
        if n.op == "call_module" and n.target == STORE_NAME:
            continue
        graph.erase_node(n)


# ------------------------------------------------------------------------------------------------ FLOPs


# counted by the one cost engine (passes/timing.py); named here for the cache points' FLOPs
node_flops, flops_by_node, graph_flops = timing.node_flops, timing.flops_by_node, timing.graph_flops


def describe(gm: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """Candidates as rows for a table."""
    return [
        dict(path=c.path, module=c.module_class, skipped=round(c.skipped_fraction, 4), cached_bytes=c.nbytes)
        for c in candidates(gm)
    ]


__all__ = [
    "CachePoint", "FeatureCache", "RehashLoad", "RehashStore", "candidates", "deepcache_point", "describe",
    "full_graph", "graph_flops", "kept_nodes", "layer_candidates", "module_output", "node_flops", "partial_graph",
    "resolve", "storing_graph", "up_block_paths",
]
