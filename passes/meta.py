"""The one namespaced key fxstream stores on ``node.meta``, and its typed record."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

META_KEY = "fxstream"


@dataclass
class NodeInfo:
    """What the passes record on a node.

    workspace_bytes: transient memory the node allocates and frees while it runs, beyond its output (an
        outlined sliced group: the peak of one slice's intermediates; SDPA: its attention workspace).
    group: name of the operator group the node belongs to, if any.
    loop: what an outlined loop (a sliced group's, a row-streamed segment's) runs, for the time model
        (:class:`passes.timing.LoopCost`).
    """

    workspace_bytes: int | None = None
    group: str | None = None
    loop: object | None = None


def node_info(node: torch.fx.Node) -> NodeInfo:
    """The node's :class:`NodeInfo`, created empty on first access."""
    info = node.meta.get(META_KEY)
    if info is None:
        info = node.meta[META_KEY] = NodeInfo()
    return info


# ------------------------------------------------------------------------------------------------------------
# what a node's metadata says: where it ran, its value's bytes and storage


def module_path(node: torch.fx.Node | None) -> str:
    """The innermost module the node ran in (``down_blocks.0.attentions.1.proj_in``); "" at the top level."""
    stack = (node.meta.get("nn_module_stack") if node is not None else None) or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if not isinstance(path, str):
        return ""
    # export writes "L['self'].down_blocks[0].resnets[1]" or "down_blocks.0.resnets.1"; normalise to dots
    path = path.replace("L['self'].", "").replace("L['self']", "")
    for a, b in (("[", "."), ("]", ""), ("'", "")):
        path = path.replace(a, b)
    return path.strip(".")


def tensor_bytes(v: object) -> int:
    """Bytes of a value's elements (a tensor, or a list/tuple of them); views count their own elements. Sizes that
    depend on the data (``nonzero``'s) count at their largest (the bound export's shape environment knows)."""
    if isinstance(v, torch.Tensor):
        return upper_bound(v.numel()) * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(tensor_bytes(x) for x in v)
    return 0


def size_hint(n: int | torch.SymInt) -> int | None:
    """A size as a number: ``n`` itself, the value a symbolic size was traced with, or None for a size that
    depends on the data."""
    if isinstance(n, int):
        return n
    node = getattr(n, "node", None)
    hint = getattr(node, "hint", None) if node is not None else None
    return int(hint) if hint is not None else None


def upper_bound(n: int | torch.SymInt) -> int:
    """``n`` itself, or for a size that depends on the data, its largest value (export's shape environment
    bounds ``nonzero``'s count by its input's size)."""
    if isinstance(n, int):
        return n
    hint = size_hint(n)
    if hint is not None:
        return hint
    try:
        upper = n.node.shape_env.bound_sympy(n.node.expr).upper
        return int(upper)
    except (AttributeError, TypeError, ValueError, OverflowError):
        raise ValueError(f"no upper bound for the data-dependent size {n}") from None


def storage_key(t: torch.Tensor) -> object:
    """A hashable identity of the storage behind ``t`` (shared by its views)."""
    try:
        return StorageWeakRef(t.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return ("tensor", id(t))


def node_storage(node: torch.fx.Node) -> object:
    """The storage identity of a node's tensor value; the node itself for any other value."""
    v = node.meta.get("val")
    return storage_key(v) if isinstance(v, torch.Tensor) else node


def aliases_input(node: torch.fx.Node) -> bool:
    """Whether the node's tensor value shares its first input's storage, as the fake values show it (a reshape
    of a non-contiguous tensor copies)."""
    x = node.args[0] if node.args else None
    out = node.meta.get("val")
    src = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if not isinstance(out, torch.Tensor) or not isinstance(src, torch.Tensor):
        return False
    return storage_key(out) == storage_key(src)


def fake_value(target, args: tuple, kwargs: dict | None = None):
    """What ``target`` returns on fake values: the arguments' ``meta["val"]`` for nodes, run under their fake mode
    (a view of its input's fake storage for a view op, as eager would give)."""
    from torch._guards import detect_fake_mode

    args, kwargs = torch.fx.node.map_arg((tuple(args), dict(kwargs or {})), lambda a: a.meta["val"])
    tensors: list[torch.Tensor] = []
    torch.fx.node.map_aggregate((args, kwargs), lambda x: tensors.append(x) if isinstance(x, torch.Tensor) else None)
    mode = detect_fake_mode(tensors)
    if mode is None:
        return target(*args, **kwargs)
    with mode:
        return target(*args, **kwargs)
