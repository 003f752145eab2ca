"""The runtime of key-chunked attention: an attention whose keys and values are computed chunk by chunk.

``scaled_dot_product_attention(q, k, v)`` needs every key and value of the sequence; a transformer makes them from
the residual stream with a short per-token chain (norm, modulation, projection, qk-norm, rotary), so at full size
the two are as large as the stream itself and stay whole for the whole call. :class:`KeyChunkedAttention` runs that
chain (``bodies``: the planner's outlined subgraph, per chunk length) on one chunk of the key positions at a time,
attends the queries to that chunk, and combines the chunks' outputs with their log-sum-exp (the online softmax of
flash attention, done across calls): ``out = sum_j exp(lse_j - lse) * out_j`` with ``lse = logsumexp_j lse_j``.
Only one chunk of keys and values exists at a time. The result equals the attention over all keys up to float
reordering (each chunk's kernel normalises its own part; the parts combine in float32).

The chain is recomputed on every call, so a query-sliced group that calls this once per query slice computes the
keys and values once per slice: the planner (:mod:`passes.keys`) uses it only where memory asks for it.

Bottom layer: imports torch and the sliced-loop helpers only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxstream.runtime.sliced import SlicedInput, slice_bounds


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k, v`` (4-D, no mask) and its float32 log-sum-exp per query (B, H, Lq): the
    kernel that also returns it where the device has one, else the math path."""
    if q.device.type == "cpu" and q.shape[-1] == k.shape[-1] == v.shape[-1]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == k.shape[-1] == v.shape[-1] \
                and q.shape[-1] <= 256:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                          scale=scale)[:2]
            return out, lse
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                          scale=scale)[:2]
        return out, lse[..., : q.shape[-2]]
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.float()).to(q.dtype)
    return out, lse


class KeyChunkedAttention:
    """The op the planner puts in place of an attention node: called as ``op(q, *inputs)``, where ``inputs`` are
    what the key/value chain reads (whole, or sliced along the key positions per ``input_specs``).

    bodies: the chain for a chunk of ``n`` key positions, ``bodies[n](*inputs_chunk) -> (k, v)``; bounds: the
    chunks; scale: SDPA's; ``key_length``, ``value_dim``: of the whole keys and values (FLOPs); ``cone_workspace``:
    the chain's predicted peak on the largest chunk, its outputs included (the memory model's workspace);
    ``cone_costs``: what one run of the chain over all keys costs (:class:`passes.timing.NodeCost` s).
    An instance is an FX ``call_function`` target: it has a name and a module, and is not copied by graph copies.
    """

    __module__ = __name__

    def __init__(self, name: str, bodies: dict[int, nn.Module], chunks: int, key_length: int,
                 input_specs: list[SlicedInput], scale: float | None, value_dim: int, cone_workspace: int,
                 cone_costs: list | None = None, cone_nodes: int = 0):
        self.__name__ = "key_chunked_attention"
        self.__qualname__ = self.__name__
        self.name = name
        self.bodies = {int(n): b for n, b in bodies.items()}
        self.chunks = chunks
        self.key_length = key_length
        self.bounds = slice_bounds(key_length, chunks)
        self.input_specs = list(input_specs)
        self.scale = scale
        self.value_dim = value_dim
        self.cone_workspace = cone_workspace
        self.cone_costs = list(cone_costs or [])
        self.cone_nodes = cone_nodes

    def __call__(self, q: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        acc = lse = None
        for a, b in self.bounds:
            n = b - a
            feed = [x if spec.dim is None else x.narrow(spec.dim, a * spec.unit, n * spec.unit)
                    for x, spec in zip(inputs, self.input_specs)]
            k, v = self.bodies[n](*feed)
            del feed
            out, part = attention_with_lse(q, k, v, self.scale)
            del k, v
            if acc is None:
                acc, lse = out.float(), part.float()
                continue
            new = torch.logaddexp(lse, part)
            acc.mul_(torch.exp(lse - new).unsqueeze(-1))
            acc.addcmul_(out, torch.exp(part - new).unsqueeze(-1))  # in float32, with no float32 copy of out
            lse = new
            del out, part, new
        return acc.to(q.dtype)

    def workspace_bytes(self, q: torch.Tensor) -> int:
        """Transient bytes of one call for queries ``q`` (a fake value is enough), besides the output: the chain on
        one chunk and its keys and values, the float32 accumulator, one chunk's output, and the log-sum-exps."""
        rows = math.prod(q.shape[:-1])
        return self.cone_workspace + rows * self.value_dim * (4 + q.element_size()) + 4 * rows * 4

    def __repr__(self) -> str:
        return f"KeyChunkedAttention({self.name!r}, chunks={self.chunks})"


__all__ = ["KeyChunkedAttention", "attention_with_lse"]
