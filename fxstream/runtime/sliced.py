"""The runtime of a sliced operator group: run an outlined subgraph slice by slice.

Outputs are preallocated at full size and each slice's results are written into them (no list of slices
concatenated at the end, so no second full-size copy at the join); an output the plan writes in place goes into
the storage of an input that dies at the call (a residual stream: ``x + f(x)`` sliced along tokens), and an output
that only a ``cat`` reads goes into its range of the joined tensor (:func:`join_buffer`, :func:`join_into`). A
slice's intermediates are freed before the next slice starts. Reductions over the sliced axis (GroupNorm statistics) are combined across slices.
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
    # the index of an input whose storage receives this output (it dies at the call, and slice ``i`` of the
    # output depends only on slice ``i`` of it): written slice by slice in place of a new tensor
    into: int | None = None
    # the index of an argument (after the inputs the body reads) that is this output's range of a joined tensor:
    # written there, so the join (``join_into``) has nothing to copy for it
    dest: int | None = None


def slice_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous ranges covering ``range(length)``; all of size ceil(length/chunks) but the last."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    step = -(-length // min(chunks, length))
    return [(a, min(a + step, length)) for a in range(0, length, step)]


@dataclass
class SlicePass:
    """One pass over the slices: ``bodies[n]`` computes the values for ``target_slots`` from a slice of ``n``
    positions; it also reads the complete reductions in ``reduced_slots`` from earlier passes, whole."""

    bodies: dict[int, nn.Module]
    target_slots: list[int]
    reduced_slots: list[int]


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class SlicedCall(nn.Module):
    """Runs a group's passes, each a loop over the slices, and returns the group's outputs.

    ``slots`` are the values the loop keeps: the group's outputs (the first ``num_outputs`` slots) and the
    complete reductions a later pass reads. A sliced slot is preallocated at full size and filled slice by
    slice; a reduction slot is combined across slices.
    """

    def __init__(
        self,
        name: str,
        passes: list[SlicePass],
        length: int,
        chunks: int,
        inputs: list[SlicedInput],
        slots: list[SlicedOutput],
        num_outputs: int,
    ):
        super().__init__()
        self.group_name = name
        self.length = length
        self.chunks = chunks
        self.bounds = slice_bounds(length, chunks)
        self.input_specs = inputs
        self.slot_specs = slots
        self.num_outputs = num_outputs
        self.pass_specs = [(p.target_slots, p.reduced_slots) for p in passes]
        self.bodies = nn.ModuleList(
            nn.ModuleDict({str(n): body for n, body in p.bodies.items()}) for p in passes
        )

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        values: list[torch.Tensor | None] = [
            self._buffer(spec, args, device) if spec.dim is not None else None
            for spec in self.slot_specs[: self.num_outputs]
        ] + [None] * (len(self.slot_specs) - self.num_outputs)
        for bodies, (targets, reduced) in zip(self.bodies, self.pass_specs):
            extra = [values[i] for i in reduced]
            for a, b in self.bounds:
                n = b - a
                feed = [
                    x if spec.dim is None else x.narrow(spec.dim, a * spec.unit, n * spec.unit)
                    for x, spec in zip(args, self.input_specs)
                ]
                out = list(bodies[str(n)](*feed, *extra))
                del feed
                for i, slot in enumerate(targets):
                    spec = self.slot_specs[slot]
                    if spec.dim is not None:
                        piece = values[slot].narrow(spec.dim, a * spec.unit, n * spec.unit)
                        if spec.into is not None and _shares_storage(out[i], piece):
                            out[i] = out[i].clone()  # a view of the slice it overwrites (copy_ can't overlap)
                        piece.copy_(out[i])
                    elif values[slot] is None:
                        values[slot] = out[i]
                    else:
                        values[slot] = spec.combine(values[slot], out[i])
                    out[i] = None  # free this slice's result now, not when the next slice overwrites a name
                del out
        return tuple(values[: self.num_outputs])

    @staticmethod
    def _buffer(spec: SlicedOutput, args: tuple, device: torch.device) -> torch.Tensor:
        """The tensor a sliced output is written into: its input's storage when planned so (and the input is
        as planned: same shape and dtype, contiguous), else a new one."""
        if spec.into is not None:
            x = args[spec.into]
            if tuple(x.shape) == spec.shape and x.dtype == spec.dtype and x.is_contiguous():
                return x
        if spec.dest is not None:
            x = args[spec.dest]
            if tuple(x.shape) == spec.shape and x.dtype == spec.dtype and x.device == device:
                return x
        return torch.empty(spec.shape, dtype=spec.dtype, device=device)

    def extra_repr(self) -> str:
        return (f"group={self.group_name!r}, length={self.length}, chunks={self.chunks}, "
                f"passes={len(self.pass_specs)}")


def join_buffer(like: torch.Tensor, shape: list[int], dtype: torch.dtype, order: list[int] | None = None
                ) -> torch.Tensor:
    """The tensor a ``cat`` of sliced groups' outputs is made in, allocated before the first group writes its
    range (on ``like``'s device): contiguous, or laid out with its dims in memory in ``order`` (outermost first:
    the layout of a part whose views reach the join, a token-major projection seen head-major)."""
    if order is None:
        return like.new_empty(shape, dtype=dtype)
    return like.new_empty([shape[i] for i in order], dtype=dtype).permute([order.index(i) for i in range(len(order))])


def join_into(buffer: torch.Tensor, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(parts, dim)`` made in ``buffer``: each part is copied into its range, unless it is that range
    already (a sliced group wrote it there). Returns ``buffer``."""
    offset = 0
    for p in parts:
        n = p.shape[dim]
        dest = buffer.narrow(dim, offset, n)
        if not _same_view(p, dest):
            dest.copy_(p)
        offset += n
    return buffer


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory (strides of dims of size 1 do not count)."""
    return a.shape == b.shape and a.data_ptr() == b.data_ptr() and all(
        s == 1 or x == y for s, x, y in zip(a.shape, a.stride(), b.stride()))
