"""The runtime of a row-streamed segment: run a stretch of the graph band of rows by band of rows.

A segment (see :mod:`passes.rows`) reads one full-size tensor and writes one (a chunk of a decode loop also
reads the convolution cache of the chunk before by bands, and writes its own: side inputs and outputs); in between, every node runs on
a band of its rows. Bands run top to bottom and each computes only rows no earlier band computed; the rows
above a band that a convolution reads are kept from the previous band. Normalisations whose statistics span
the rows run in several passes over the bands: statistics first (combined exactly across bands), values
after. The program of each pass is worked out when the plan is made: this module only interprets it; its
environment lives for the pass, so rows kept for the next band survive from one band to the next.

Program instructions (tuples; trailing fields are the planner's byte counts, ignored here):

``("op", slot, fn, args, kwargs, post, nbytes)``
    ``slot = fn(*args, **kwargs)``; argument markers :class:`Band` (rows of a slot), :class:`Ext` (a whole
    input of the segment) and :class:`Stats` (complete statistics) are replaced by their values; ``post``
    is ``None`` or ``(dim, start, length)``, a narrowing of the result (nearest upsampling computes whole
    input rows, then keeps the band).
``("stats", key, band, groups, nbytes)``
    GroupNorm statistics of ``band`` (rows this band computed first, never rows kept from the previous
    band), combined into ``key``.
``("out", band, (start, length), k)``
    rows ``[start, start + length)`` of output ``k`` (0: the segment's output; then its side outputs), owned by
    this band, written into it.
``("free", slots)``
    drop slots no later instruction of this band reads.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from fxstream.runtime.ops import combine_partials, group_norm_apply, group_norm_partial


class Band(NamedTuple):
    """Rows ``[start, start + length)`` of slot ``slot`` along ``dim`` (``dim`` None: the slot whole)."""

    slot: int
    dim: int | None
    start: int = 0
    length: int = 0


class Ext(NamedTuple):
    """The segment's ``index``-th whole input (weights, small tensors computed outside)."""

    index: int


class Stats(NamedTuple):
    """The complete GroupNorm statistics under ``key``."""

    key: int


def group_norm_rows(x: torch.Tensor, stats: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """GroupNorm of a band of rows with statistics of the whole tensor. A band is a strided view; this
    normalises it without copying it first (one output-sized allocation in float32)."""
    if x.dtype != torch.float32:
        return group_norm_apply(x.contiguous(), stats, num_groups, weight, bias, eps)
    n, c = x.shape[0], x.shape[1]
    count, mean, m2 = stats.unbind(-1)
    rstd = torch.rsqrt(m2 / count + eps)
    shape = (n, c) + (1,) * (x.dim() - 2)
    per_group = c // num_groups
    mean_c = mean.repeat_interleave(per_group, dim=1).reshape(shape)
    scale_c = rstd.repeat_interleave(per_group, dim=1).reshape(shape)
    if weight is not None:
        scale_c = scale_c * weight.reshape((1, c) + (1,) * (x.dim() - 2))
    out = x - mean_c
    out.mul_(scale_c)
    if bias is not None:
        out.add_(bias.reshape((1, c) + (1,) * (x.dim() - 2)))
    return out


def conv_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
              transposed: bool, output_padding, groups: int) -> torch.Tensor:
    """A convolution on a band of rows (``aten.convolution``'s arguments). On the CPU in float32, where torch runs
    a whole video's convolution of this kind with oneDNN, the band runs it with oneDNN too: torch's choice also
    weighs the input's size and gives a batch-1 input of at most 20,480 channels x frames x rows its native
    kernel, several times slower per FLOP (a 3x3x3 convolution over 32 channels, 11 frames and 34 of 128 rows
    took 0.10 s there, the whole 128 rows 0.06 s with oneDNN). The same sums in another order: exact to rounding,
    as a band's convolution is anyway."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and not transposed
            and x.dim() in (4, 5) and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and (any(s != 1 for s in stride) or any(d != 1 for d in dilation) or x.shape[0] >= 16
                 or weight.shape[-1] != 1 or weight.shape[-2] != 1 or torch.get_num_threads() > 1)):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


class RowStream(nn.Module):
    """Runs one row-streamed segment: ``forward(segment_input, *whole_inputs) -> segment_output``, or the tuple
    ``(segment_output, *side_outputs)`` when it has side outputs. ``sides`` pairs each negative slot the programs
    read side inputs from by bands with the whole input it is."""

    def __init__(self, name: str, programs: list[list[tuple]], out_shape: tuple[int, ...], out_dtype: torch.dtype,
                 out_dim: int, num_passes: int, bands: int, side_outputs: tuple = (), sides: tuple = ()):
        super().__init__()
        self.segment_name = name
        self.programs = programs  # one per pass, its bands in order
        self.out_shape = out_shape
        self.out_dtype = out_dtype
        self.out_dim = out_dim
        self.num_passes = num_passes
        self.bands = bands
        self.side_outputs = tuple(side_outputs)  # (shape, dtype, row dim) of each
        self.sides = tuple(sides)  # (slot, index into the whole inputs)

    def forward(self, x: torch.Tensor, *whole: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = [torch.empty(self.out_shape, dtype=self.out_dtype, device=x.device)]
        outs += [torch.empty(shape, dtype=dtype, device=x.device) for shape, dtype, _ in self.side_outputs]
        dims = [self.out_dim] + [d for _, _, d in self.side_outputs]
        stats: dict[int, torch.Tensor] = {}

        def value(a: Any, env: dict[int, torch.Tensor]) -> Any:
            if isinstance(a, Band):
                t = env[a.slot]
                return t if a.dim is None else t.narrow(a.dim, a.start, a.length)
            if isinstance(a, Ext):
                return whole[a.index]
            if isinstance(a, Stats):
                return stats[a.key]
            if isinstance(a, (list, tuple)) and any(isinstance(b, (Band, Ext, Stats)) for b in a):
                return type(a)(value(b, env) for b in a)
            return a

        for program in self.programs:  # one per pass
            env: dict[int, torch.Tensor] = {0: x}
            for slot, i in self.sides:
                env[slot] = whole[i]
            for ins in program:
                kind = ins[0]
                if kind == "op":
                    _, slot, fn, args, kwargs, post = ins[:6]
                    r = fn(*[value(a, env) for a in args], **{k: value(v, env) for k, v in kwargs.items()})
                    if post is not None:
                        r = r.narrow(*post)
                    env[slot] = r
                elif kind == "free":
                    for s in ins[1]:
                        env.pop(s, None)
                elif kind == "stats":
                    _, key, band, groups = ins[:4]
                    part = group_norm_partial(value(band, env), groups)
                    stats[key] = part if key not in stats else combine_partials(stats[key], part)
                else:  # "out"
                    _, band, (start, length), k = ins
                    outs[k].narrow(dims[k], start, length).copy_(value(band, env))
            del env
        return tuple(outs) if self.side_outputs else outs[0]

    def extra_repr(self) -> str:
        return f"segment={self.segment_name!r}, bands={self.bands}, passes={self.num_passes}"
