"""passes.reductions: GroupNorm whose statistics span the sliced axis, computed exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxstream.capture import capture
from fxstream.runtime.sliced import slice_bounds
from fxstream.runtime.ops import APPLY_OP, PARTIAL_OP, combine_partials, group_norm_apply, group_norm_partial
from passes.reductions import split_group_norms


def sliced_group_norm(x, groups, weight, bias, eps, chunks, dim, exact=True):
    """GroupNorm of ``x`` computed slice by slice along ``dim``: exact statistics, or per-slice ones."""
    bounds = slice_bounds(x.shape[dim], chunks)
    if exact:
        stats = None
        for a, b in bounds:
            part = group_norm_partial(x.narrow(dim, a, b - a), groups)
            stats = part if stats is None else combine_partials(stats, part)
        return torch.cat([group_norm_apply(x.narrow(dim, a, b - a), stats, groups, weight, bias, eps)
                          for a, b in bounds], dim)
    return torch.cat([F.group_norm(x.narrow(dim, a, b - a), groups, weight, bias, eps) for a, b in bounds], dim)


def test_group_norm_over_c_t_h_w_sliced_along_h_equals_eager_and_per_slice_statistics_do_not():
    torch.manual_seed(0)
    # (B, C, T, H, W) as in SVD's temporal ResBlock; a per-row gradient makes per-slice statistics differ
    x = torch.randn(2, 8, 5, 9, 6) + torch.linspace(-3, 3, 9)[None, None, None, :, None]
    w, b = torch.randn(8), torch.randn(8)
    ref = F.group_norm(x, 4, w, b, 1e-5)
    for chunks in (2, 3, 4, 7):
        exact = sliced_group_norm(x, 4, w, b, 1e-5, chunks, dim=3)
        assert (exact - ref).abs().max() <= 1e-5 * ref.abs().max()
        per_slice = sliced_group_norm(x, 4, w, b, 1e-5, chunks, dim=3, exact=False)
        assert (per_slice - ref).abs().max() > 1e-2 * ref.abs().max()


def test_half_inputs_accumulate_statistics_in_float32():
    torch.manual_seed(0)
    x = (torch.randn(1, 4, 3, 64, 64) * 4 + 100).half()
    stats = group_norm_partial(x, 2)
    assert stats.dtype == torch.float32
    ref = torch.var_mean(x.float().reshape(1, 2, -1), dim=-1, correction=0)
    assert torch.allclose(stats[..., 1], ref[1], rtol=1e-6)
    assert torch.allclose(stats[..., 2] / stats[..., 0], ref[0], rtol=1e-4)
    out = group_norm_apply(x, stats, 2, None, None, 1e-5)
    assert out.dtype == torch.float16


def test_split_group_norms_rewrites_the_graph_exactly():
    torch.manual_seed(0)
    norm = nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 5, 5)
    gm = capture(norm, x)
    nodes = [n for n in gm.graph.nodes if n.target is torch.ops.aten.group_norm.default]
    assert split_group_norms(gm, nodes) == 1
    targets = [n.target for n in gm.graph.nodes]
    assert PARTIAL_OP in targets and APPLY_OP in targets
    assert torch.ops.aten.group_norm.default not in targets
    assert (gm(x) - norm(x)).abs().max() <= 1e-5


def test_apply_allocates_only_its_output():
    from fxstream.measure import measure

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 32, 4, 64, 64).to(dtype)
        stats = group_norm_partial(x, 8)
        w, b = torch.randn(32), torch.randn(32)
        m = measure(group_norm_apply, x, stats, 8, w, b, 1e-5)
        out_bytes = x.numel() * x.element_size()
        assert m.activation_peak_bytes <= out_bytes * 1.3, dtype
        ref = F.group_norm(x.float(), 8, w, b, 1e-5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (m.output.float() - ref).abs().max() <= tol * ref.abs().max()


def test_pairs_on_the_same_tensor_fuse_back_into_group_norm():
    from passes.reductions import fuse_group_norms

    torch.manual_seed(0)
    norm = nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 5, 5)
    gm = capture(norm, x)
    split_group_norms(gm, [n for n in gm.graph.nodes if n.target is torch.ops.aten.group_norm.default])
    assert fuse_group_norms(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.aten.group_norm.default in targets and PARTIAL_OP not in targets and APPLY_OP not in targets
    assert torch.equal(gm(x), norm(x))
