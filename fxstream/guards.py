"""Guards: what a compiled graph was built from, checked on every call, so a compiled module never runs stale.

A captured graph holds the module's Parameter and buffer objects and bakes in everything else its forward read:
the module tree, the submodules' plain attributes (flags such as peft's ``_disable_adapters``, LoRA scales,
FreeU's factors, attention processors) and the devices and dtypes of the weights. :func:`fingerprint` reads all
of that in one walk of the tree; a compiled module compares it with the one taken when it compiled and, when
anything differs, drops every graph it holds (and with them the old tensors) and compiles again.

What is read, per submodule: its identity and class; each parameter's and buffer's identity, device, dtype and
shape; the forward hooks' and pre-hooks' identities; and each other instance attribute: plain values (numbers,
strings, None, and tuples, lists, sets and dicts of them) by value, tensors by identity, device, dtype and
shape, anything else (processors, bound methods, a patched ``forward``) by identity. Identities stay valid
because the guard keeps the objects it read alive until the next compile (:class:`Fingerprint` holds them), so
no freed object's address can be reused by a new one unnoticed.

Most calls need less than the walk: :meth:`Fingerprint.fast_unchanged` reads the modification stamps CPython
keeps on every dict (PEP 509, read as torch.compile's guards read them) of each submodule's ``__dict__``,
parameters, buffers, children and hooks, plus what changes without touching a dict (a weight's ``.data``
swapped for another dtype or device, a list or dict attribute changed in place). Any stamp that moved sends the
check to the full walk, which decides. Where the stamps are unavailable, every check is the full walk.

Not seen: a value changed in place inside an object compared by identity (an attribute of an attention
processor, say), and global state the forward reads (module-level variables, environment). In-place edits of
weights need no guard: the graph reads the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# nn.Module's own bookkeeping: read separately (parameters, buffers, children, hooks) or irrelevant to forward.
_MODULE_INTERNALS = frozenset({
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_pre_hooks",
    "_backward_hooks", "_is_full_backward_hook", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    # torch's in-place module.compile() and fxstream's in-place install (fxstream.optimize) use this slot
    "_compiled_call_impl",
})
# Values read by value (exact types: a subclass may compare in its own way).
_PLAIN_TYPES = frozenset({bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device})
# How deep plain containers are read by value; deeper ones are compared by identity.
_MAX_DEPTH = 3


def _dict_version_reader() -> Any:
    """CPython's per-dict modification stamp (PEP 509), as torch.compile's guards read it; None where this
    Python or torch does not provide one that changes on every modification."""
    try:
        from torch._C._dynamo.guards import dict_version
    except ImportError:
        return None
    probe: dict = {}
    try:
        first = dict_version(probe)
        probe["a"] = 1
        second = dict_version(probe)
        probe["a"] = 2
        third = dict_version(probe)
    except Exception:  # noqa: BLE001 - any failure means: no fast path
        return None
    return dict_version if first != second != third else None


_DICT_VERSION = _dict_version_reader()


@dataclass
class Fingerprint:
    """What one walk of a module tree read: ``items`` to compare, ``keep`` (the objects whose identities
    ``items`` holds, kept alive) and, when asked for, ``paths`` (the submodule of each item, for messages).

    The fast check reads less: the modification stamps of every dict the walk read (``versions``: a submodule's
    ``__dict__``, its parameters, buffers, children and hooks), and what changes without touching any of them
    (``tensors``: a weight's ``.data`` swapped for another dtype or device; ``containers``: lists, sets and
    dicts held in attributes, changed in place)."""

    items: list = field(default_factory=list)
    keep: list = field(default_factory=list, repr=False)
    paths: list | None = None
    dicts: list = field(default_factory=list, repr=False)
    stamps: list = field(default_factory=list, repr=False)
    tensors: list = field(default_factory=list, repr=False)
    tensor_tokens: list = field(default_factory=list, repr=False)
    containers: list = field(default_factory=list, repr=False)

    def fast_unchanged(self) -> bool:
        """True when nothing the walk read can have changed (no stamp moved; tensors and containers as read)."""
        if _DICT_VERSION is None:
            return False
        return (list(map(_DICT_VERSION, self.dicts)) == self.stamps
                and [_tensor_token(t) for t in self.tensors] == self.tensor_tokens
                and all(_token(value, [], 0) == token for value, token in self.containers))

    def take_fast_state(self, other: Fingerprint) -> None:
        self.dicts, self.stamps, self.keep = other.dicts, other.stamps, other.keep
        self.tensors, self.tensor_tokens, self.containers = other.tensors, other.tensor_tokens, other.containers


def _tensor_token(t: torch.Tensor) -> tuple:
    # get_device(): -1 on the CPU, the index on an accelerator (t.device would build a new object each time)
    return (t.get_device(), t.is_meta, t.dtype, t.shape)


def changed(module: nn.Module, before: Fingerprint) -> str | None:
    """None when ``module`` reads as it did when ``before`` was taken; else what changed first, in words."""
    if before.fast_unchanged():
        return None
    now = fingerprint(module)
    if now.items == before.items:  # rewritten with the same values: read fast again from now on
        before.take_fast_state(now)
        return None
    now = fingerprint(module, paths=True)
    for i, (old, new) in enumerate(zip(before.items, now.items)):
        if old != new:
            return f"{now.paths[i] or 'the module'}: {_describe(new)}"
    return "the module tree changed (submodules added or removed)"


def fingerprint(module: nn.Module, *, paths: bool = False) -> Fingerprint:
    """Read everything a captured graph of ``module`` depends on (see the module docstring); with ``paths``,
    also which submodule each item belongs to."""
    out = Fingerprint(paths=[] if paths else None)
    items, keep = out.items, out.keep
    append, keep_append = items.append, keep.append
    dicts, tensors, containers = out.dicts, out.tensors, out.containers
    version = _DICT_VERSION
    skip = _MODULE_INTERNALS
    plain = _PLAIN_TYPES
    stack = [("", module)]
    while stack:
        path, m = stack.pop()
        d = m.__dict__
        keep_append(m)
        start = len(items)
        append(id(m))
        append(type(m))
        if version is not None:
            for table in (d, d["_parameters"], d["_buffers"], d["_modules"], d.get("_forward_pre_hooks"),
                          d.get("_forward_hooks")):
                if table is not None:
                    dicts.append(table)
        for kind in ("_parameters", "_buffers"):
            for name, t in d[kind].items():
                if t is None:
                    append((kind, name, None))
                else:
                    keep_append(t)
                    tensors.append(t)
                    append((kind, name, id(t), *_tensor_token(t)))
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = d.get(kind)
            if hooks:
                keep_append(tuple(hooks.values()))
                append((kind, tuple(map(id, hooks.values()))))
        for name, value in d.items():
            if name in skip:
                continue
            kind = type(value)
            if kind in plain and value == value:  # nan != nan: _token reads it
                append((name, kind, value))
            elif kind is tuple and all(type(v) in plain for v in value):  # kernel sizes, strides, shapes
                append((name, kind, value))
            else:
                token = _token(value, keep, 0)
                append((name, token))
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
                elif isinstance(value, (tuple, list, set, frozenset, dict)):
                    containers.append((value, token))
        children = d["_modules"]
        for name in reversed(children):
            child = children[name]
            append(("child", name, None if child is None else id(child)))
            if child is not None:
                stack.append((f"{path}.{name}" if path else name, child))
        if out.paths is not None:
            out.paths.extend([path] * (len(items) - start))
    # read last: the walk itself changes no dict, and a stamp read before a tensor token would be no safer
    if version is not None:
        out.stamps = list(map(version, dicts))
    out.tensor_tokens = [_tensor_token(t) for t in tensors]
    return out


def _token(value: Any, keep: list, depth: int) -> Any:
    if type(value) in _PLAIN_TYPES:
        # type first: True == 1 == 1.0, and a flag turned into a number is a change
        return (type(value), value) if value == value else (float, "nan")
    if isinstance(value, torch.Tensor):
        keep.append(value)
        return ("tensor", id(value), *_tensor_token(value))
    if depth < _MAX_DEPTH:
        if type(value) in (tuple, list):
            return (type(value), tuple(_token(v, keep, depth + 1) for v in value))
        if type(value) in (set, frozenset) and all(type(v) in _PLAIN_TYPES for v in value):
            return (type(value), frozenset(value))
        if isinstance(value, dict) and type(value).__eq__ is dict.__eq__:
            return (type(value), tuple((_token(k, keep, depth + 1), _token(v, keep, depth + 1))
                                       for k, v in value.items()))
    keep.append(value)
    return ("object", id(value), type(value))


def _describe(item: Any) -> str:
    if isinstance(item, type):
        return f"submodule replaced ({item.__name__})"
    if not isinstance(item, tuple):
        return "submodule replaced"
    kind = item[0]
    if kind in ("_parameters", "_buffers"):
        what = "parameter" if kind == "_parameters" else "buffer"
        if item[2] is None:
            return f"{what} {item[1]!r} is None"
        return f"{what} {item[1]!r} replaced, moved or cast"
    if kind == "child":
        return f"child {item[1]!r} added, removed or replaced"
    if kind in ("_forward_pre_hooks", "_forward_hooks"):
        return f"{kind.strip('_').replace('_', ' ')} changed"
    return f"attribute {kind!r} changed"
