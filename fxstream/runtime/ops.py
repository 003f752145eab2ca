"""The custom ops fxstream inserts into compiled graphs: GroupNorm split into statistics and apply.

``group_norm_partial(x, G)`` computes per (sample, group) count, mean and M2 in float32; partials of disjoint
parts of the same groups combine exactly (:func:`combine_partials`, Chan et al.'s parallel variance);
``group_norm_apply(x, stats, G, weight, bias, eps)`` normalises with complete statistics. Unsliced, the pair
equals ``aten.group_norm`` up to float reordering. How the graph passes slice them is in the op table
(:mod:`passes.ops`); where they are inserted, :mod:`passes.reductions`.

Bottom layer: imports torch only. Registering the ops with torch.library is what importing this module does;
every module that runs or builds graphs containing them imports it.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("fxstream::group_norm_partial", mutates_args=())
def group_norm_partial(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(N, G, 3) float32 statistics of ``x`` (N, C, ...) per sample and channel group: count, mean, M2."""
    n = x.shape[0]
    g = x.reshape(n, num_groups, -1)
    if g.dtype == torch.float32:
        var, mean = torch.var_mean(g, dim=-1, correction=0)
    else:
        # one channel group at a time, so a half input is never copied whole to float32
        parts = [torch.var_mean(g[:, i].float(), dim=-1, correction=0) for i in range(num_groups)]
        var = torch.stack([v for v, _ in parts], dim=1)
        mean = torch.stack([m for _, m in parts], dim=1)
    count = torch.full_like(mean, g.shape[-1])
    return torch.stack([count, mean, var * count], dim=-1)


@group_norm_partial.register_fake
def _(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], num_groups, 3), dtype=torch.float32)


def combine_partials(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two partial statistics of disjoint parts of the same groups (exact up to rounding)."""
    na, ma, m2a = a.unbind(-1)
    nb, mb, m2b = b.unbind(-1)
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    m2 = m2a + m2b + delta * delta * (na * nb / n)
    return torch.stack([n, mean, m2], dim=-1)


@torch.library.custom_op("fxstream::group_norm_apply", mutates_args=())
def group_norm_apply(
    x: torch.Tensor,
    stats: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Normalise ``x`` (N, C, ...) with complete statistics from :func:`group_norm_partial`.

    Allocates nothing of x's size but the output (the memory model counts only the output): float32 works in
    place on the output; half inputs are normalised in float32 one channel group at a time.
    """
    n, c = x.shape[0], x.shape[1]
    per_group = c // num_groups
    count, mean, m2 = stats.unbind(-1)
    rstd = torch.rsqrt(m2 / count + eps)
    mean_c = mean.repeat_interleave(per_group, dim=1)[:, :, None]  # (N, C, 1) float32
    scale_c = rstd.repeat_interleave(per_group, dim=1)[:, :, None]
    if weight is not None:
        scale_c = scale_c * weight.float()[None, :, None]
    shift_c = bias.float()[None, :, None] if bias is not None else None
    xs = x.reshape(n, c, -1)
    if x.dtype == torch.float32:
        out = xs - mean_c
        out.mul_(scale_c)
        if shift_c is not None:
            out.add_(shift_c)
        return out.reshape(x.shape)
    out = torch.empty_like(xs)
    for g in range(num_groups):
        ch = slice(g * per_group, (g + 1) * per_group)
        y = (xs[:, ch].float() - mean_c[:, ch]).mul_(scale_c[:, ch])
        if shift_c is not None:
            y.add_(shift_c[:, ch])
        out[:, ch] = y
    return out.reshape(x.shape)


@group_norm_apply.register_fake
def _(x, stats, num_groups, weight, bias, eps):
    return torch.empty_like(x)


PARTIAL_OP = torch.ops.fxstream.group_norm_partial.default
APPLY_OP = torch.ops.fxstream.group_norm_apply.default
