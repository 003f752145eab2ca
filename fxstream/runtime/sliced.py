"""The runtime of a sliced operator group: run an outlined subgraph slice by slice.

Outputs are preallocated at full size and each slice's results are written into them (no list of slices
concatenated at the end, so no second full-size copy at the join). A slice's intermediates are freed before
the next slice starts. Reductions over the sliced axis (GroupNorm statistics) are combined across slices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SlicedInput:
    """How the loop feeds one input to the body: narrowed along ``dim`` in units of ``unit``, or whole."""

    dim: int | None  # None: whole
    unit: int = 1


@dataclass(frozen=True)
class SlicedOutput:
    """One output of the body: a slice written into a preallocated tensor, or a reduction to combine."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    dim: int | None  # None: a reduction, combined with ``combine``
    unit: int = 1
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def slice_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous ranges covering ``range(length)``; all of size ceil(length/chunks) but the last."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    step = -(-length // min(chunks, length))
    return [(a, min(a + step, length)) for a in range(0, length, step)]


class SlicedCall(nn.Module):
    """Calls ``bodies[n]`` (the group's subgraph for a slice of ``n`` positions) once per slice."""

    def __init__(
        self,
        name: str,
        bodies: dict[int, nn.Module],
        length: int,
        chunks: int,
        inputs: list[SlicedInput],
        outputs: list[SlicedOutput],
    ):
        super().__init__()
        self.group_name = name
        self.length = length
        self.chunks = chunks
        self.bounds = slice_bounds(length, chunks)
        self.input_specs = inputs
        self.output_specs = outputs
        self.bodies = nn.ModuleDict({str(n): body for n, body in bodies.items()})

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        results: list[torch.Tensor | None] = [
            torch.empty(spec.shape, dtype=spec.dtype, device=device) if spec.dim is not None else None
            for spec in self.output_specs
        ]
        for a, b in self.bounds:
            n = b - a
            feed = [
                x if spec.dim is None else x.narrow(spec.dim, a * spec.unit, n * spec.unit)
                for x, spec in zip(args, self.input_specs)
            ]
            out = self.bodies[str(n)](*feed)
            del feed
            for i, spec in enumerate(self.output_specs):
                if spec.dim is not None:
                    results[i].narrow(spec.dim, a * spec.unit, n * spec.unit).copy_(out[i])
                elif results[i] is None:
                    results[i] = out[i]
                else:
                    results[i] = spec.combine(results[i], out[i])
            del out
        return tuple(results)

    def extra_repr(self) -> str:
        return f"group={self.group_name!r}, length={self.length}, chunks={self.chunks}"
