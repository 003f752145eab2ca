"""Capture an ``nn.Module`` into an ATen-level ``torch.fx.GraphModule`` with ``torch.export``.

Non-strict export is used because it is 3-5x faster than strict export on the diffusers video UNets and gives
the same graph (``../shared/reference/CAPTURE-NOTES.md``). Shapes are static: one capture per input signature.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import operator
import threading
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxstream import guards, hooks
from fxstream.errors import CaptureError
from passes.functional import functionalize
from passes.slicing import copy_graph_module

# Parameter names whose python-number values are turned into 0-d tensors before export. A python number
# would be specialised into a guard (``timestep == 500``) and the graph would be valid for one step only.
TIMESTEP_NAMES = ("timestep", "timesteps", "t")

# Side-effect-only checks that export inserts around dtype conversions. They would hold their operand whole
# (and so block slicing through every ``.to(dtype)``); static export already fixed what they check.
_CHECK_OPS = (torch.ops.aten._assert_tensor_metadata.default,)

# torch.export is not thread-safe (two captures at once fail popping each other's modes): one at a time.
_CAPTURE_LOCK = threading.RLock()


def normalize_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Bind ``args``/``kwargs`` to ``module.forward`` and turn python-number timesteps into 0-d tensors."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"arguments do not match {type(module).__name__}.forward: {e}") from e
    # every parameter explicit and positional where it can be: the graph is called exactly as it was captured,
    # and a keyword after a skipped default cannot fall off the end of ``bound.args``
    bound.apply_defaults()
    device = _first_tensor_device(args, kwargs)
    for name in TIMESTEP_NAMES:
        value = bound.arguments.get(name)
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            bound.arguments[name] = torch.tensor(float(value), device=device)
    return tuple(bound.args), dict(bound.kwargs)


def _first_tensor_device(args: tuple, kwargs: dict) -> torch.device | None:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            return value.device
    return None


@contextlib.contextmanager
def _plain_call(module: nn.Module) -> Iterator[None]:
    """Calls of ``module`` run its own forward while it is captured: the slot ``nn.Module.compile()`` and
    ``fxstream.optimize`` install their compiled call in (``_compiled_call_impl``) is emptied meanwhile."""
    installed = module.__dict__.get("_compiled_call_impl")
    if installed is None:
        yield
        return
    module.__dict__["_compiled_call_impl"] = None
    try:
        yield
    finally:
        module.__dict__["_compiled_call_impl"] = installed


class _MetaAutocast(torch.autocast):
    """``torch.autocast`` for a capture on the meta device: a region entered for the inputs' device type
    (``torch.autocast(x.device.type, ...)``, Mochi's rotary embedding) runs as on the CPU with autocast off.
    torch refuses device type "meta"; the models that do this ask for float32, which no device's autocast
    supports (torch disables it there, with a warning), so off is what every real device runs."""

    def __init__(self, device_type: str, dtype: torch.dtype | None = None, enabled: bool = True,
                 cache_enabled: bool | None = None):
        if device_type == "meta":
            device_type, enabled = "cpu", False
        super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


@contextlib.contextmanager
def _meta_autocast(args: tuple, kwargs: dict) -> Iterator[None]:
    device = _first_tensor_device(args, kwargs)
    if device is None or device.type != "meta":
        yield
        return
    original = torch.autocast
    torch.autocast = _MetaAutocast
    try:
        yield
    finally:
        torch.autocast = original


@contextlib.contextmanager
def _module_stack(module: nn.Module) -> Iterator[list[str]]:
    """Track which submodule is running, so a capture failure can name it."""
    stack: list[str] = []
    handles = []
    for name, sub in module.named_modules():
        label = name or type(module).__name__

        def pre(_m, _a, label=label):
            stack.append(label)

        def post(_m, _a, _o, label=label):
            if stack and stack[-1] == label:
                stack.pop()

        handles.append(sub.register_forward_pre_hook(pre))
        handles.append(sub.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _failing_operation(exc: BaseException) -> str:
    """The innermost source line of the traceback that is not in torch's own tracing machinery."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename:
            return f"{frame.line.strip() if frame.line else '?'} ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"
    return type(exc).__name__


def signature_of(args: tuple) -> tuple:
    """A hashable key of the normalised call: tensors by shape, dtype and device; other values by repr."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append(("T", tuple(a.shape), str(a.dtype), str(a.device)))
        else:
            key.append(("V", repr(a)))
    return tuple(key)


@dataclass
class _Captured:
    """A capture kept for reuse: the guard's reading of the module when it was taken (``items``, whose identities
    ``refs`` watch without keeping anything alive) and the graph, never handed out itself (copies are)."""

    items: list
    refs: list
    graph_module: torch.fx.GraphModule

    def matches(self, now: guards.Fingerprint) -> bool:
        # every object read by identity still alive (so no id in ``items`` was reused), and the same readings
        return all(r() is not None for r in self.refs) and self.items == now.items


# The captures of each module, kept while the module lives: compiling it again for the same inputs (another
# budget, a plan replayed after a LoRA is unloaded, fxstream.optimize run twice) reuses the graph instead of
# exporting again, under the same guard that decides when a compiled module's own graphs are still valid.
_CAPTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MAX_CAPTURES = 4  # per module, least recently used dropped first


def _weak_refs(keep: list) -> list | None:
    """Weak references to what a fingerprint read by identity (a hook tuple: to each hook); None where one
    cannot be referenced weakly (that capture is not kept: holding it could keep the module alive)."""
    refs = []
    for obj in keep:
        for x in (obj if type(obj) is tuple else (obj,)):
            try:
                refs.append(weakref.ref(x))
            except TypeError:
                return None
    return refs


def forget_captures(module: nn.Module | None = None) -> None:
    """Drop the captures kept for ``module`` (every module's, with None): the next compile exports again. Needed
    only after changing global state a forward reads (which no guard sees), such as a process-wide attention
    backend."""
    with _CAPTURE_LOCK:
        if module is None:
            _CAPTURES.clear()
        else:
            _CAPTURES.pop(module, None)


def capture(module: nn.Module, *args: Any, **kwargs: Any) -> torch.fx.GraphModule:
    """Capture ``module(*args, **kwargs)`` as an ATen-level GraphModule.

    Works on real tensors and on meta or fake tensors (for full-size models built without weights). The
    returned GraphModule takes the same arguments (after :func:`normalize_inputs`) and returns the same
    output structure as the module; every node carries ``meta["val"]`` and ``meta["nn_module_stack"]``.
    A module captured before for the same inputs, grad and autocast modes, and unchanged by the guard's reading
    (:mod:`fxstream.guards`) gets a copy of that graph, without exporting again (:func:`forget_captures`).

    Raises:
        CaptureError: naming the submodule that was running and the operation that failed.
    """
    args, kwargs = normalize_inputs(module, args, kwargs)
    key = (signature_of(args), signature_of(tuple(kwargs.items())), torch.is_grad_enabled(),
           torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"), torch.get_default_dtype())
    with _CAPTURE_LOCK:  # one capture at a time (see _export), and the kept ones read and written by one thread
        now = guards.fingerprint(module)
        kept = _CAPTURES.get(module)
        hit = kept.get(key) if kept is not None else None
        if hit is not None and hit.matches(now):
            kept.move_to_end(key)
            return copy_graph_module(hit.graph_module)[0]
        gm = _export(module, args, kwargs)
        refs = _weak_refs(now.keep)
        if refs is None:
            return gm
        kept = _CAPTURES.setdefault(module, OrderedDict())
        kept[key] = _Captured(now.items, refs, gm)
        kept.move_to_end(key)
        while len(kept) > MAX_CAPTURES:
            kept.popitem(last=False)
        return copy_graph_module(gm)[0]


def _export(module: nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """torch.export and the clean-up passes: :func:`capture` without reuse."""
    with (_CAPTURE_LOCK, _plain_call(module), hooks.traced_as_graph(module), _meta_autocast(args, kwargs),
          _module_stack(module) as stack):
        try:
            exported = torch.export.export(module, args, kwargs, strict=False)
        except Exception as e:  # export raises many unrelated types; all mean "could not capture"
            module_path = stack[-1] if stack else type(module).__name__
            operation = _failing_operation(e)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CaptureError(
                f"could not capture {type(module).__name__}: failed in module '{module_path}' at "
                f"{operation}: {type(e).__name__}: {first_line}",
                module_path=module_path,
                operation=operation,
            ) from e
    gm = exported.module()
    strip_checks(gm)
    functionalize(gm)
    convert_to_dtypes(gm)
    splits_to_slices(gm)
    meshgrids_to_views(gm)
    if gm.graph.eliminate_dead_code():  # values nothing reads (a causal convolution's cache after the last chunk)
        gm.recompile()
    return gm


def strip_checks(gm: torch.fx.GraphModule) -> None:
    """Remove export's side-effect-only metadata assertions (see ``_CHECK_OPS``)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _CHECK_OPS and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


_TO_OTHER = (torch.ops.aten.type_as.default, torch.ops.aten.to.other)
_SPLITS = (torch.ops.aten.split_with_sizes.default, torch.ops.aten.split.Tensor, torch.ops.aten.chunk.default)
_MESHGRIDS = (torch.ops.aten.meshgrid.default, torch.ops.aten.meshgrid.indexing)


def _read_by_getitem(node: torch.fx.Node) -> bool:
    """Whether every reader of the list-valued ``node`` takes one part of it (``getitem`` with an int)."""
    return bool(node.users) and all(u.op == "call_function" and u.target is operator.getitem
                                    and isinstance(u.args[1], int) for u in node.users)


def _replace_parts(gm: torch.fx.GraphModule, node: torch.fx.Node, part: Callable[[int], torch.fx.Node]) -> None:
    """Replace each ``getitem(node, i)`` by ``part(i)`` (nodes it adds go where the getitem was; the last one
    takes the getitem's metadata), then erase ``node``: one op per tensor instead of a list the passes would
    read whole."""
    for u in list(node.users):
        with gm.graph.inserting_before(u):
            new = part(u.args[1])
        new.meta = dict(u.meta)
        u.replace_all_uses_with(new)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)


def splits_to_slices(gm: torch.fx.GraphModule) -> int:
    """Rewrite each part taken from a split (``split``, ``split_with_sizes``, ``chunk``, read with ``getitem``)
    as a slice of the input (``aten.slice``); returns how many splits were rewritten.

    The same views, one op per tensor: the passes then see each part as a tensor with a slice rule, not as a
    list (the HunyuanVideo VAE's upsamplers split the first frame from the others: a list no band of rows
    could pass). A split with a reader other than ``getitem`` is left as it is.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SPLITS:
            continue
        parts, x = node.meta.get("val"), node.args[0]
        xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not isinstance(parts, (list, tuple)) or not isinstance(xv, torch.Tensor) or not _read_by_getitem(node):
            continue
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim = dim % xv.dim()
        starts, at = [], 0
        for part in parts:
            if not isinstance(part, torch.Tensor) or not isinstance(part.shape[dim], int):
                break
            starts.append(at)
            at += part.shape[dim]
        else:
            _replace_parts(gm, node, lambda i: gm.graph.call_function(
                torch.ops.aten.slice.Tensor, (x, dim, starts[i], starts[i] + parts[i].shape[dim])))
            rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def meshgrids_to_views(gm: torch.fx.GraphModule) -> int:
    """Rewrite each grid of ``meshgrid`` (read with ``getitem``) as what it is, its 1-D input viewed along its own
    dim and expanded to the grid (``aten.view`` + ``aten.expand``); returns how many meshgrids were rewritten.

    The same views, one op per tensor, each with a dims rule: the HunyuanVideo VAE builds its causal attention
    mask over every pair of tokens from a meshgrid of the tokens' frame indices, and the mask's rows, one per
    query, can then be sliced with the queries (the whole mask is 450 GB at 720p, 129 frames).
    ``indexing="xy"`` swaps the grid's first two dims.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MESHGRIDS:
            continue
        tensors = node.args[0]
        indexing = node.args[1] if len(node.args) > 1 else node.kwargs.get("indexing", "ij")
        values = [t.meta.get("val") if isinstance(t, torch.fx.Node) else None for t in tensors]
        if (not _read_by_getitem(node) or indexing not in ("ij", "xy")
                or not all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in values)):
            continue
        order = list(range(len(tensors)))  # grid dim of each input
        if indexing == "xy" and len(order) >= 2:
            order[0], order[1] = 1, 0
        grid = [0] * len(order)
        for i, d in enumerate(order):
            grid[d] = values[i].shape[0]

        def part(i: int, order: list = order, grid: list = grid, tensors: list = tensors,
                 values: list = values) -> torch.fx.Node:
            shape = [grid[d] if d == order[i] else 1 for d in range(len(grid))]
            view = gm.graph.call_function(torch.ops.aten.view.default, (tensors[i], shape))
            view.meta = {"val": values[i].view(shape)}
            return gm.graph.call_function(torch.ops.aten.expand.default, (view, list(grid)))

        _replace_parts(gm, node, part)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def convert_to_dtypes(gm: torch.fx.GraphModule) -> int:
    """Rewrite conversions to another tensor's type (``x.type_as(y)``, ``x.to(y)``) as conversions to its dtype
    (``aten.to.dtype``), where ``y`` is on ``x``'s device; returns how many were rewritten.

    Only ``y``'s dtype is read, but as an operand it would be kept alive until the conversion and read whole by
    every slice of a group (Wan's attention converts its output to the rotated query's type after attention,
    which forbade slicing the query with the attention). The same numbers; the conversion still returns ``x``
    itself when there is nothing to convert.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _TO_OTHER or len(node.args) < 2:
            continue
        x, other = node.args[0], node.args[1]
        xv, ov = (n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in (x, other))
        if not isinstance(xv, torch.Tensor) or not isinstance(ov, torch.Tensor) or xv.device != ov.device:
            continue
        rest = node.args[2:] if node.target is torch.ops.aten.to.other else ()
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.aten.to.dtype, (x, ov.dtype, *rest), dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
