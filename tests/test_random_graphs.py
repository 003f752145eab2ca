"""Property: random small graphs of the ops in the table, sliced every way, run exactly or fail with our error.

Programs of 2-7 steps on a token tensor ``(N, L, C)``, each step one pattern the video models use: linear and
pointwise chains, splits along the channels (equal ``chunk``, unequal ``split_with_sizes``, ``unbind`` of a
head dim) and along the tokens (a text/video split), ``cat`` back, attention over heads, softmax, LayerNorm,
timestep modulation (a ``(N, 6C)`` table chunked into six and broadcast over the tokens), a reduction over the
tokens, a residual from an earlier step, and an op with no rule (``cumsum``, a barrier). Each program is
compiled at the minimum budget and with forced slice counts, and held to the suite's rule: ``max|compiled -
eager| <= 1e-5 * max|eager|`` in fp32, or an :class:`~fxstream.errors.FxStreamError`; the planner's net
(:class:`PlanningWarning`) counts as a failure. Examples are derandomised: CI sees the same programs every run.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxstream
from fxstream.errors import FxStreamError, PlanningWarning

pytestmark = pytest.mark.usefixtures("one_thread")

C = 16
STEPS = ("linear", "gelu_affine", "chunk_swap", "split_sizes", "split_tokens", "unbind_heads", "attention",
         "softmax", "layer_norm", "modulation", "center_tokens", "residual", "cumsum")


class Program(nn.Module):
    def __init__(self, steps: list[str], seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.steps = list(steps)
        self.linears = nn.ModuleList(nn.Linear(C, C) for _ in steps)
        self.table = nn.Parameter(torch.randn(1, 6 * C) * 0.1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        n, length, c = x.shape
        history = [x]
        mods = (self.table + temb).chunk(6, dim=1)
        for i, step in enumerate(self.steps):
            if step == "linear":
                x = self.linears[i](x)
            elif step == "gelu_affine":
                x = F.gelu(x) * 1.5 + 0.25
            elif step == "chunk_swap":
                a, b = x.chunk(2, dim=-1)
                x = torch.cat([b * 2, a.sin()], dim=-1)
            elif step == "split_sizes":
                a, b, c3 = x.split([c // 2, c // 4, c // 4], dim=-1)
                x = torch.cat([c3, a.cos(), b], dim=-1)
            elif step == "split_tokens":
                head, rest = x.split([1, length - 1], dim=1)
                x = torch.cat([rest, self.linears[i](head)], dim=1)
            elif step == "unbind_heads":
                a, b = x.view(n, length, 2, c // 2).unbind(2)
                x = torch.cat([a * b, a - b], dim=-1)
            elif step == "attention":
                q = self.linears[i](x).view(n, length, 2, c // 2).transpose(1, 2)
                k = x.view(n, length, 2, c // 2).transpose(1, 2)
                x = F.scaled_dot_product_attention(q, k, k).transpose(1, 2).reshape(n, length, c)
            elif step == "softmax":
                x = x.softmax(dim=-1)
            elif step == "layer_norm":
                x = F.layer_norm(x, (c,))
            elif step == "modulation":
                x = x * (1 + mods[0][:, None]) + mods[1][:, None]
            elif step == "center_tokens":
                x = x - x.mean(dim=1, keepdim=True)
            elif step == "residual":
                x = x + history[len(history) // 2]
            elif step == "cumsum":
                x = x.cumsum(dim=1) / length
            history.append(x)
        return x * mods[5][:, None]


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(
    steps=st.lists(st.sampled_from(STEPS), min_size=2, max_size=7),
    batch=st.sampled_from([1, 2]),
    length=st.sampled_from([4, 6, 9]),
    chunks=st.sampled_from([None, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_random_programs_run_exactly_or_fail_with_our_error(steps, batch, length, chunks, seed):
    module = Program(steps, seed).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    x, temb = torch.randn(batch, length, C, generator=gen), torch.randn(1, 6 * C, generator=gen)
    ref = module(x, temb)
    compiled = fxstream.compile(module, chunks=chunks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanningWarning)
        try:
            out = compiled(x, temb)
        except FxStreamError as e:
            assert str(e)
            return
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), (steps, err)
