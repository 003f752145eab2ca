"""``backend="inductor"``: each sliced group's body compiled by Inductor, once per distinct slice shape.

A sliced group runs one body per slice size (``SlicedCall.bodies``: the last slice may be shorter). Each body is
an ATen graph already, so it goes straight to Inductor (``torch._inductor.compile``), with no Dynamo: it is
compiled on its first call, with that call's real inputs (the narrowed views the loop feeds it, so the compiled
code expects their strides), and every later slice of that size reuses it. Each slice stays its own call:
Inductor sees one slice's graph at a time and cannot fuse across slices, so the plan's memory bound holds;
inside a slice it fuses freely (fewer intermediates than eager, never more live at the slice's peak than the
whole slice graph's values).

The rest of the graph (what the plan leaves unsliced, row-streamed segments) runs as planned, eager.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxstream.runtime.sliced import SlicedCall


class InductorBody(nn.Module):
    """One slice body, compiled by Inductor on its first call (see the module docstring)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self._compiled: Any = None

    def forward(self, *args: torch.Tensor) -> Any:
        if self._compiled is None:
            import torch._inductor

            self._compiled = torch._inductor.compile(self.body, list(args))
        return self._compiled(*args)

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state["_compiled"] = None  # generated code does not travel; it is compiled again on first use
        return state


def compile_bodies(graph_module: torch.fx.GraphModule) -> int:
    """Wrap every sliced group's bodies in ``graph_module`` for Inductor; returns how many were wrapped."""
    count = 0
    for module in graph_module.modules():
        if isinstance(module, SlicedCall):
            for bodies in module.bodies:
                for n in list(bodies.keys()):
                    if not isinstance(bodies[n], InductorBody):
                        bodies[n] = InductorBody(bodies[n])
                        count += 1
    return count
