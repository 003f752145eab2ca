"""diffusers' switches and weight-memory tools with fxstream.optimize: each behaves as on the plain pipeline.

A representative slice of diffusers' own pipeline checks, on the tiny AnimateDiff pipeline, each against a
plain copy given the same calls: FreeU on and off, fused QKV projections, an attention processor swap,
layerwise casting (float8 storage), group offloading (block and leaf level) and model CPU offload, and a
save/load round trip. The LoRA adapter API is covered in tests/test_guards.py.

On this CPU-only machine offloading moves nothing (compute and offload device are both the CPU), so the offload
tests make it visible: every weight a group offloads is replaced by NaNs until the group is onloaded again. A
graph that read any weight outside its group's onload window would return NaNs.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import fxstream
from fxstream import hooks
from fxstream.module import installed
from tests.pipes import load, slicing_budget_gb, unet_call

RTOL = 1e-5
CPU = torch.device("cpu")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def _compiled_unet(pipe):
    compiled = installed(pipe.unet)
    assert compiled is not None and compiled._fx_cache, "the compiled UNet did not run"
    return compiled


@pytest.fixture(scope="module")
def optimized(animatediff):
    """(plain, compiled) copies of the pipeline, shared by the switch tests: ``pipe`` optimized under a budget
    that slices (tests/pipes.py) and called once (compiled), ``plain`` given the same switches. Each switch
    test starts from whatever switches the tests before it left on both (the compiled graph of that state
    already built) and switches further: a first compile per test would rebuild the same graph."""
    plain, pipe = load(animatediff), load(animatediff)
    fxstream.optimize(pipe, budget_gb=slicing_budget_gb(pipe))
    assert _rel(unet_call(pipe), unet_call(plain)) <= RTOL
    return plain, pipe


def _switch_takes_effect(optimized, switch, *, moves: bool = True):
    """Call, switch both pipelines, call: the compiled output follows the plain one exactly, through a
    recompile. Returns the (plain, compiled) pipelines, switched."""
    plain, pipe = optimized
    before = unet_call(plain)
    assert _rel(unet_call(pipe), before) <= RTOL
    recompiles = len(_compiled_unet(pipe)._fx_recompiles)
    switch(plain)
    switch(pipe)
    ref = unet_call(plain)
    if moves:
        assert _rel(ref, before) > 1e3 * RTOL, "the switch had no effect on the plain pipeline"
    assert _rel(unet_call(pipe), ref) <= RTOL
    compiled = _compiled_unet(pipe)
    assert compiled.plan.sliced_groups, "not sliced"
    assert len(compiled._fx_recompiles) == recompiles + 1, "not recompiled"
    return plain, pipe


# -- switches --------------------------------------------------------------------------------------------------

def test_freeu_on_and_off_after_optimize(optimized):
    # FreeU writes into slices of the hidden states and builds a Fourier mask in place (passes/functional.py)
    plain, pipe = _switch_takes_effect(optimized, lambda p: p.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4))
    recompiles = len(_compiled_unet(pipe)._fx_recompiles)
    for p in (plain, pipe):
        p.disable_freeu()
    assert _rel(unet_call(pipe), unet_call(plain)) <= RTOL
    assert len(_compiled_unet(pipe)._fx_recompiles) == recompiles + 1


def test_fused_qkv_projections_after_optimize(optimized):
    # the same numbers through fused weights: the check is that the compiled UNet runs the fused modules
    _, pipe = _switch_takes_effect(optimized, lambda p: p.fuse_qkv_projections(), moves=False)
    graph = _compiled_unet(pipe).compiled.graph_module
    assert any("to_qkv" in str(n.target) for n in graph.graph.nodes if n.op == "get_attr"), "unfused graph"


class _Doubled(nn.Module):
    """An attention processor that doubles the attention output (a visible swap)."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()

    def __call__(self, *args, **kwargs):
        return 2 * self.inner(*args, **kwargs)


def test_attention_processor_swap_after_optimize(optimized):
    _switch_takes_effect(optimized, lambda p: p.unet.set_attn_processor(_Doubled()))


# -- layerwise casting -----------------------------------------------------------------------------------------

def _cast(pipe) -> None:
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


@pytest.mark.parametrize("when", ["before", "after"])
def test_layerwise_casting_keeps_float8_weights_and_the_output(animatediff, when):
    plain, pipe = load(animatediff), load(animatediff)
    _cast(plain)
    if when == "before":
        _cast(pipe)
        result = fxstream.optimize(pipe, budget_gb=slicing_budget_gb(pipe, 4, 16))
    else:
        result = fxstream.optimize(pipe, "min")
        uncast = result.resident_weight_bytes
        unet_call(pipe, 4, 16)
        _cast(pipe)
    # 4 frames of 16x16 latents: large enough that activations, not the weights' transient float32 copies,
    # make the peak (at 2 frames of 8x8 the minimum plan slices nothing)
    ref = unet_call(plain, 4, 16)
    assert _rel(unet_call(pipe, 4, 16), ref) <= RTOL
    compiled = _compiled_unet(pipe)
    assert compiled.plan.sliced_groups
    stored = {p.dtype for p in pipe.unet.parameters()}
    assert torch.float8_e4m3fn in stored  # still stored in float8 after the compiled calls
    # the graph holds the float8 Parameters themselves and casts each layer's copy inside
    graph = compiled.compiled.graph_module
    values = [functools.reduce(getattr, n.target.split("."), graph) for n in graph.graph.nodes if n.op == "get_attr"]
    held = [v for v in values if isinstance(v, torch.Tensor)]
    unet_params = {id(p) for p in pipe.unet.parameters()}
    assert any(t.dtype == torch.float8_e4m3fn for t in held) and all(id(t) in unet_params for t in held
                                                                       if t.dtype == torch.float8_e4m3fn)
    casts = [n for m in graph.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
             if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor) and n.args
             and isinstance(n.args[0], torch.fx.Node) and n.meta["val"].dtype == torch.float32
             and getattr(n.args[0].meta.get("val"), "dtype", None) == torch.float8_e4m3fn]
    float8_layers = [m for m in pipe.unet.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                     and m.weight.dtype == torch.float8_e4m3fn]
    assert len(casts) >= len(float8_layers) > 0, "the weights are not cast inside the graph"
    # the memory model counts the weights at their storage size
    assert compiled.plan.weight_bytes < sum(p.numel() for p in pipe.unet.parameters()) * 4
    if when == "after":
        assert fxstream.optimize(pipe, "min").resident_weight_bytes < uncast


# -- offloading ------------------------------------------------------------------------------------------------

@pytest.fixture
def visible_offload(monkeypatch):
    """Group offloading on the CPU, made visible: an offloaded group's floating weights read as NaN."""
    from diffusers.hooks.group_offloading import ModuleGroup

    saved: dict[int, torch.Tensor] = {}

    def tensors(group):
        out = [t for m in group.modules for t in (*m.parameters(), *m.buffers())]
        return out + list(group.parameters) + list(group.buffers)

    def offload(self):
        for t in tensors(self):
            if t.is_floating_point() and id(t) not in saved:
                saved[id(t)] = t.data
                t.data = torch.full_like(t.data, math.nan)

    def onload(self):
        for t in tensors(self):
            data = saved.pop(id(t), None)
            if data is not None:
                t.data = data

    monkeypatch.setattr(ModuleGroup, "offload_", offload)
    monkeypatch.setattr(ModuleGroup, "onload_", onload)
    return saved


@pytest.mark.parametrize("level", ["block_level", "leaf_level"])
def test_group_offloading_moves_each_group_around_its_own_nodes(animatediff, visible_offload, level):
    plain, pipe = load(animatediff), load(animatediff)
    ref = unet_call(plain)
    options = dict(onload_device=CPU, offload_device=CPU, offload_type=level)
    if level == "block_level":
        options["num_blocks_per_group"] = 1
    budget_gb = slicing_budget_gb(pipe)  # measured without the hooks, which make copies while they run
    plain.unet.enable_group_offload(**options)
    assert _rel(unet_call(plain), ref) <= RTOL  # diffusers' own hooks, as the baseline
    pipe.unet.enable_group_offload(**options)
    fxstream.optimize(pipe, budget_gb=budget_gb)
    offloaded = len(visible_offload)
    assert offloaded > 0
    out = unet_call(pipe)
    assert not out.isnan().any(), "a weight was read while its group was offloaded"
    assert _rel(out, ref) <= RTOL
    assert len(visible_offload) == offloaded, "a group stayed onloaded after the call"
    compiled = _compiled_unet(pipe)
    assert compiled.plan.sliced_groups
    moves = [m for m in compiled.compiled.graph_module.modules() if isinstance(m, hooks.GroupMove)]
    groups = hooks.offload_groups(pipe.unet)
    assert len(moves) == 2 * len(groups) and len(groups) > 1
    assert _rel(unet_call(pipe), ref) <= RTOL  # and again: no recompile for the weights' moves
    assert not compiled._fx_recompiles


def test_model_cpu_offload_runs_its_hook_around_the_compiled_call(animatediff, monkeypatch):
    from accelerate.hooks import CpuOffload

    calls = []
    original = CpuOffload.pre_forward

    def spy(self, module, *args, **kwargs):
        calls.append(type(module).__name__)
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(CpuOffload, "pre_forward", spy)
    plain, pipe = load(animatediff), load(animatediff)
    budget_gb = slicing_budget_gb(pipe)  # measured without the hook, which makes copies while it runs
    for p in (plain, pipe):
        p.enable_model_cpu_offload(device="cpu")
    fxstream.optimize(pipe, budget_gb=budget_gb)
    ref = unet_call(plain)
    calls.clear()
    assert _rel(unet_call(pipe), ref) <= RTOL
    assert calls == ["UNetMotionModel"]
    assert _compiled_unet(pipe).plan.sliced_groups


def test_save_and_load_round_trip_after_optimize(animatediff, tmp_path):
    pipe = load(animatediff)
    budget_gb = slicing_budget_gb(pipe)
    fxstream.optimize(pipe, budget_gb=budget_gb)
    ref = unet_call(pipe)
    assert _compiled_unet(pipe).plan.sliced_groups
    pipe.save_pretrained(tmp_path)
    loaded = load(str(tmp_path))
    assert installed(loaded.unet) is None
    assert _rel(unet_call(loaded), ref) <= RTOL
    fxstream.optimize(loaded, budget_gb=budget_gb)
    assert _rel(unet_call(loaded), ref) <= RTOL
    assert _compiled_unet(loaded).plan.sliced_groups


def test_components_offloaded_while_idle_do_not_count_against_the_others(animatediff):
    from accelerate import cpu_offload_with_hook

    pipe = load(animatediff)
    before = fxstream.optimize(pipe, budget_gb=1.0)
    unet_bytes = before.component("unet").weight_bytes
    decoder_before = before.component("vae.decoder")
    before.restore()
    # model CPU offload towards an accelerator: the UNet leaves it while the VAE decodes (not called here)
    cpu_offload_with_hook(pipe.unet, "cuda")
    assert hooks.away_while_idle(pipe.unet) and not hooks.away_while_idle(pipe.vae)
    after = fxstream.optimize(pipe, budget_gb=1.0)
    decoder = after.component("vae.decoder")
    assert decoder.other_weight_bytes == decoder_before.other_weight_bytes - unet_bytes
    assert decoder.budget_bytes == decoder_before.budget_bytes + unet_bytes
    assert after.resident_weight_bytes == before.resident_weight_bytes - unet_bytes


def test_the_running_component_is_never_away(animatediff):
    # The whole VAE is offloaded while idle; while its decoder runs, the VAE's encoder is on the device too.
    from accelerate import cpu_offload_with_hook

    pipe = load(animatediff)
    for component in (pipe.unet, pipe.vae):
        cpu_offload_with_hook(component, "cuda")
    result = fxstream.optimize(pipe, budget_gb=1.0)
    decoder = result.component("vae.decoder")
    encoder_rest = sum(p.numel() * p.element_size() for p in [*pipe.vae.parameters(), *pipe.vae.buffers()]) \
        - decoder.weight_bytes
    assert encoder_rest > 0
    assert decoder.other_weight_bytes == result.resident_weight_bytes + encoder_rest
    assert result.component("unet").other_weight_bytes == result.resident_weight_bytes
