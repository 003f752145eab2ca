"""diffusers' and accelerate's weight-memory hooks, as fxstream's compiled graphs run them.

The weight-memory tools users combine with fxstream act through hooks on a module's forward, which a captured
graph would either fail to trace (they move or cast parameters in place) or silently drop (the graph never
calls the module's forward again). Each is handled here, in one place:

- Layerwise casting (``enable_layerwise_casting``: weights stored in, say, float8, cast per layer to the
  compute dtype): traced as casts inside the graph. While capturing, each hooked layer runs on copies of its
  own parameters cast to the compute dtype, so the graph holds the weights in their storage dtype and casts a
  layer's copy just before the layer (the values the hooks compute); the memory model counts the weights at
  their storage size and each transient copy as any other intermediate.
- Group offloading (``enable_group_offload``: blocks or leaf layers whose weights live on an offload device and
  move to the compute device around their forward): the graph moves each group itself. Its hooks are not
  traced; in the planned graph, each group is onloaded just before the first node that reads one of its
  weights and offloaded just after the last one (the group's own ``onload_``/``offload_``, so disk and pinned
  offloading work as diffusers does them; prefetching on a side stream becomes a synchronous onload). A
  weight is never copied: the graph reads the very Parameters the hooks move.
- Model CPU offload (``enable_model_cpu_offload``, accelerate's hook on the whole component): its
  ``pre_forward`` (move this component to the compute device, the previous one back to the CPU) and
  ``post_forward`` run around every compiled call, as they run around the module's forward.

Capturing sees the weights where they compute: offloaded groups are onloaded while the module is traced
(the trace computes nothing, but the weights are on the device meanwhile) and offloaded after.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

_CASTING = "LayerwiseCastingHook"
# diffusers' group offloading hooks: the one that moves a group, and the two that record the execution order
# for prefetching
_GROUP = "GroupOffloadingHook"
_GROUP_ORDER = ("LazyPrefetchGroupOffloadingHook", "LayerExecutionTrackerHook")


def _diffusers_hooks(module: nn.Module) -> list[Any]:
    registry = module.__dict__.get("_diffusers_hook")
    return list(getattr(registry, "hooks", {}).values())


def _accelerate_hook(module: nn.Module) -> Any:
    """accelerate's hook on ``module`` (``add_hook_to_module``), or None."""
    d = module.__dict__
    return d.get("_hf_hook") if "_old_forward" in d and "forward" in d else None


def offload_groups(module: nn.Module) -> list[Any]:
    """The group-offloading groups (diffusers' ``ModuleGroup``) on ``module``'s tree, each once."""
    groups, seen = [], set()
    for sub in module.modules():
        for hook in _diffusers_hooks(sub):
            group = getattr(hook, "group", None)
            if type(hook).__name__ == _GROUP and group is not None and id(group) not in seen:
                seen.add(id(group))
                groups.append(group)
    return groups


def away_while_idle(module: nn.Module) -> bool:
    """Whether ``module``'s weights leave the compute device while other components run: accelerate's model
    offload hook with an execution device other than the CPU, or group offloading to another device."""
    hook = _accelerate_hook(module)
    device = getattr(hook, "execution_device", None)
    if device is not None and torch.device(device).type != "cpu":
        return True
    groups = offload_groups(module)
    return bool(groups) and all(torch.device(g.onload_device).type != torch.device(g.offload_device).type
                                for g in groups)


# -- capture -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def traced_as_graph(module: nn.Module) -> Iterator[None]:
    """While ``module`` is captured: layerwise casts become casts in the graph, group offloading's hooks do
    nothing (every group onloaded meanwhile), and accelerate's hook on the module is bypassed (its
    ``pre_forward`` has already run, by :func:`before_call`)."""
    patched: list[tuple[Any, Any, Any, Any]] = []
    bypassed = []
    groups = offload_groups(module)
    try:
        for sub in module.modules():
            for hook in _diffusers_hooks(sub):
                ref = getattr(hook, "fn_ref", None)
                kind = type(hook).__name__
                if ref is None or kind not in (_CASTING, _GROUP, *_GROUP_ORDER):
                    continue
                patched.append((ref, ref.pre_forward, ref.post_forward, ref.forward))
                ref.pre_forward, ref.post_forward = _unchanged_inputs, _unchanged_output
                if kind == _CASTING:
                    ref.forward = functools.partial(_run_cast, sub, ref.forward, hook.compute_dtype)
        if _accelerate_hook(module) is not None:
            bypassed.append((module, module.__dict__["forward"]))
            module.__dict__["forward"] = module._old_forward
        for group in groups:
            _onload(group)
        yield
    finally:
        for group in groups:
            group.offload_()
        for sub, forward in bypassed:
            sub.__dict__["forward"] = forward
        for ref, pre, post, forward in reversed(patched):
            ref.pre_forward, ref.post_forward, ref.forward = pre, post, forward


def _unchanged_inputs(_module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    return args, kwargs


def _unchanged_output(_module: nn.Module, output: Any) -> Any:
    return output


def _run_cast(layer: nn.Module, forward: Any, dtype: torch.dtype, *args: Any, **kwargs: Any) -> Any:
    cast = {name: p.to(dtype) for name, p in layer.named_parameters(recurse=False)}
    with _reparametrize_module(layer, cast):
        return forward(*args, **kwargs)


# -- calling -------------------------------------------------------------------------------------------------

def before_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """What the module's own hooks do before its forward, where the compiled call still needs it: accelerate's
    ``pre_forward`` (model CPU offload moves the component in, the previous one out) and the move of the
    inputs to a root offload group's device."""
    hook = _accelerate_hook(module)
    if hook is not None:
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
    for h in _diffusers_hooks(module):
        if type(h).__name__ == _GROUP:
            device = h.group.onload_device
            args, kwargs = _to_device((args, kwargs), device)
    return args, kwargs


def after_call(module: nn.Module, output: Any) -> Any:
    hook = _accelerate_hook(module)
    return hook.post_forward(module, output) if hook is not None else output


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_device(v, device) for v in tree)
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    return tree


def _onload(group: Any) -> None:
    group.onload_()
    stream = getattr(group, "stream", None)
    if stream is not None:
        stream.synchronize()


class GroupMove(nn.Module):
    """A graph node's module: move an offload group's weights in (``onload``) or out."""

    def __init__(self, group: Any, onload: bool):
        super().__init__()
        self.group = group
        self.onload = onload

    def forward(self) -> None:
        if self.onload:
            _onload(self.group)
        else:
            self.group.offload_()

    def extra_repr(self) -> str:
        return f"{'onload' if self.onload else 'offload'} {getattr(self.group, 'group_id', '')}"


def place_moves(gm: torch.fx.GraphModule, module: nn.Module) -> int:
    """Insert each offload group's onload before the first node of ``gm`` that reads one of its weights and its
    offload after the last; returns how many groups are moved by the graph. ``gm`` is a planned graph of
    ``module`` (it reads the module's own Parameters); groups it never reads stay offloaded."""
    groups = offload_groups(module)
    if not groups:
        return 0
    owner: dict[int, int] = {}
    for i, group in enumerate(groups):
        tensors = [t for m in group.modules for t in (*m.parameters(), *m.buffers())]
        tensors += list(group.parameters) + list(group.buffers)
        for t in tensors:
            owner.setdefault(id(t), i)
    graph = gm.graph
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    first: dict[int, torch.fx.Node] = {}
    last: dict[int, torch.fx.Node] = {}

    def read(node: torch.fx.Node, i: int) -> None:
        if i not in first or position[node] < position[first[i]]:
            first[i] = node
        if i not in last or position[node] > position[last[i]]:
            last[i] = node

    for node in nodes:
        if node.op == "get_attr":
            value = _attr(gm, node.target)
            i = owner.get(id(value))
            if i is not None:
                for user in _readers(node):
                    read(user, i)
        elif node.op == "call_module":  # a sliced body or row program holding weights of its own
            sub = _attr(gm, node.target)
            for t in (*sub.parameters(), *sub.buffers()):
                i = owner.get(id(t))
                if i is not None:
                    read(node, i)
    for i, group in enumerate(groups):
        if i not in first:
            continue
        gm.add_submodule(f"fx_onload_{i}", GroupMove(group, onload=True))
        gm.add_submodule(f"fx_offload_{i}", GroupMove(group, onload=False))
        with graph.inserting_before(first[i]):
            graph.call_module(f"fx_onload_{i}")
        with graph.inserting_after(last[i]):
            graph.call_module(f"fx_offload_{i}")
    graph.lint()
    gm.recompile()
    return len(first)


def _readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that read ``node``'s value: its users, and through views of it, theirs."""
    from passes import ops

    out, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        out.append(user)
        if ops.of(user).alias is ops.Alias.VIEW:
            stack.extend(user.users)
    return out


def _attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value
