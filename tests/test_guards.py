"""A compiled module stays exact for the module's whole life: guards, identity, grad, no overhead unsliced.

Each test compares against the plain module (or pipeline) after the same change. The small ``VideoBlock``
(compiles in about a second) carries the generic behaviour; the tiny SVD UNet carries what is diffusers-
specific in calls (``return_dict``, timestep forms); a tiny AnimateDiff pipeline carries diffusers' own LoRA
and FreeNoise switches, applied through the pipeline after ``fxstream.optimize``.
"""

from __future__ import annotations

import copy
import functools
import gc
import io
import os
import pickle
import subprocess
import sys
import threading
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import fxstream
from fxstream import guards, models
from fxstream.errors import EagerFallbackWarning, InterleavedGenerationError
from fxstream.module import MAX_RECOMPILES, MAX_SIGNATURES, StreamlinedModule, installed
from tests.blocks import VideoBlock
from tests.pipes import load, slicing_budget_gb, unet_call

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5
FRAMES = 3
ROOT = Path(__file__).resolve().parent.parent


def _assert_exact(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out - ref).abs().max().item()
    assert err <= RTOL * ref.abs().max().item(), f"max|out - ref| = {err:.3g}"


def _block(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return VideoBlock(8, FRAMES).eval().requires_grad_(False)


def _x(seed: int = 1, frames: int = FRAMES) -> torch.Tensor:
    return torch.randn(frames * 2, 8, 6, 6, generator=torch.Generator().manual_seed(seed))


def _compiled(module: nn.Module) -> StreamlinedModule:
    return fxstream.compile(module, chunks=3)  # every call runs sliced code


# -- the guard itself ------------------------------------------------------------------------------------------

def test_fingerprint_sees_what_a_graph_bakes_in():
    block = _block()
    before = guards.fingerprint(block)
    assert guards.changed(block, before) is None
    block.spatial.conv1.weight.mul_(1.0)  # in place: the graph reads the same tensor
    assert guards.changed(block, before) is None
    block.frames = 3  # same value
    block.spatial.scale = float("nan")  # nan compares unequal to itself: still read as unchanged
    before = guards.fingerprint(block)
    assert guards.changed(block, before) is None
    block.spatial.scale = float("nan")  # rewritten: the fast check misses, the full walk finds nothing changed
    assert not before.fast_unchanged() and guards.changed(block, before) is None
    assert before.fast_unchanged() == (guards._DICT_VERSION is not None)  # fast again, where Python has stamps

    changes = {
        "attribute": lambda m: setattr(m.spatial, "scale", 2.0),
        "dict changed in place": lambda m: m.scaling.__setitem__("a", 0.5),
        "list changed in place": lambda m: m.merged.append("a"),
        "weights cast in place": lambda m: setattr(m.temporal.conv1.weight, "data", m.temporal.conv1.weight.double()),
        "replaced parameter": lambda m: setattr(m.spatial.conv1, "weight", nn.Parameter(m.spatial.conv1.weight)),
        "dtype": lambda m: m.temporal.double(),
        "submodule": lambda m: setattr(m, "spatial", copy.deepcopy(m.spatial)),
        "hook": lambda m: m.temporal.register_forward_hook(lambda *a: None),
        "mode": lambda m: m.train(),
        "patched forward": lambda m: setattr(m.spatial, "forward", m.spatial.forward),
    }
    for what, change in changes.items():
        block = _block()
        block.scaling, block.merged = {"a": 1.0}, []
        before = guards.fingerprint(block)
        change(block)
        assert guards.changed(block, before) is not None, what


def test_a_replaced_parameter_recompiles_and_frees_the_old_one():
    block, x = _block(), _x()
    compiled = _compiled(block)
    compiled(x)
    old = block.spatial.conv1.weight
    block.spatial.conv1.weight = nn.Parameter(old * 2, requires_grad=False)
    dead = weakref.ref(old)
    del old
    _assert_exact(compiled(x), block(x))
    gc.collect()
    assert dead() is None, "the compiled module kept the replaced parameter alive"
    assert len(compiled._fx_recompiles) == 1 and "spatial.conv1" in compiled._fx_recompiles[0]


def test_load_state_dict_assign_takes_effect():
    block, other, x = _block(0), _block(1), _x()
    compiled = _compiled(block)
    compiled(x)
    old = weakref.ref(block.temporal.conv2.weight)
    block.load_state_dict(other.state_dict(), assign=True)
    _assert_exact(compiled(x), other(x))
    gc.collect()
    assert old() is None


def test_to_dtype_after_the_first_call_recompiles_and_keeps_no_old_weights():
    block, x = _block(), _x()
    compiled = _compiled(block)
    compiled(x)
    block.to(torch.float64)
    _assert_exact(compiled(x.double()), block(x.double()))
    held = [t for entry in compiled._fx_cache.values()
            for t in [*entry.graph_module.parameters(), *entry.graph_module.buffers()]]
    assert held and all(t.dtype == torch.float64 for t in held)


def test_a_module_that_keeps_changing_runs_the_original_with_a_warning():
    block, x = _block(), _x()
    compiled = _compiled(block)
    with pytest.warns(EagerFallbackWarning, match="changed"):
        for i in range(MAX_RECOMPILES + 2):
            block.temporal.step = i  # an attribute that changes on every call
            _assert_exact(compiled(x), block(x))
    assert len(compiled._fx_cache) <= 1


def _data_dependent(module, args):
    x = args[0]
    return (x * 2,) if bool((x > 100).any()) else None  # a branch on values: torch.export cannot capture it


def test_a_change_that_cannot_be_captured_runs_the_original():
    block, x = _block(), _x()
    compiled = _compiled(block)
    compiled(x)
    block.register_forward_pre_hook(_data_dependent)  # like an offload hook registered after the first call
    with pytest.warns(EagerFallbackWarning, match="cannot be captured"):
        _assert_exact(compiled(x), block(x))
    _assert_exact(compiled(x + 200), block(x + 200))  # the hook runs: the original, every call
    assert not compiled._fx_cache


# -- identity --------------------------------------------------------------------------------------------------

def test_state_dict_uses_the_original_keys_both_ways():
    block, other, x = _block(0), _block(1), _x()
    compiled = _compiled(block)
    compiled(x)
    assert list(compiled.state_dict()) == list(block.state_dict())
    compiled.load_state_dict(other.state_dict())  # a plain checkpoint loads, strict
    _assert_exact(compiled(x), other(x))
    plain = _block(2)
    plain.load_state_dict(compiled.state_dict())  # and a compiled one loads into the plain module
    _assert_exact(plain(x), other(x))
    parent = nn.Sequential(nn.Identity(), compiled)  # nested: the parent's keys are the plain parent's
    assert list(parent.state_dict()) == list(nn.Sequential(nn.Identity(), block).state_dict())
    parent.load_state_dict(nn.Sequential(nn.Identity(), _block(3)).state_dict())
    _assert_exact(compiled(x), _block(3)(x))


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_a_called_module_pickles_and_copies(how):
    block, x = _block(), _x()
    compiled = _compiled(block)
    compiled(x)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(compiled))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(compiled, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    else:
        loaded = copy.deepcopy(compiled)
    assert loaded.original is not block and not loaded._fx_cache
    _assert_exact(loaded(x), block(x))
    assert loaded.plan is not None and loaded.plan.sliced_groups


def test_first_call_from_several_threads_compiles_once():
    block, x = _block(), _x()
    compiled = _compiled(block)
    outputs, errors = [None] * 4, []

    def call(i: int) -> None:
        try:
            outputs[i] = compiled(x)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(compiled._fx_cache) == 1
    for out in outputs:
        _assert_exact(out, block(x))


def test_interleaved_rehash_generations_say_so():
    block, x = _block(), _x()
    compiled = fxstream.compile(block, chunks=2, rehash=fxstream.RehashConfig(
        cache_point="temporal.conv1", schedule=fxstream.Schedule.interval(2)))
    controller = compiled.rehash
    controller.begin_generation(4)
    compiled(x)  # step 0, this thread
    failure = []

    def other() -> None:
        try:
            compiled(x)
        except InterleavedGenerationError as e:
            failure.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert failure and "another thread" in str(failure[0])


# -- grad, torch.compile, arguments -----------------------------------------------------------------------------

def test_backward_runs_the_original_with_one_warning():
    block, x = _block(), _x()
    compiled = _compiled(block)
    block.requires_grad_(True)
    x_grad = x.clone().requires_grad_(True)
    with pytest.warns(EagerFallbackWarning, match="gradients"):
        compiled(x_grad).square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    ref = x.clone().requires_grad_(True)
    block(ref).square().sum().backward()
    for g, p in zip(grads, block.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)
    torch.testing.assert_close(x_grad.grad, ref.grad, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        compiled(x_grad)


def test_torch_compiled_modules_are_refused():
    block = _block()
    with pytest.raises(ValueError, match="torch.compile"):
        fxstream.compile(torch.compile(block))
    block.compile()
    with pytest.raises(ValueError, match="torch.compile"):
        fxstream.compile(block)


@pytest.mark.parametrize("bad", [dict(budget_gb=float("inf")), dict(chunks=True), dict(budget_gb=True)])
def test_bad_options_are_value_errors(bad):
    with pytest.raises(ValueError, match="budget_gb|chunks"):
        fxstream.compile(_block(), **bad)


# -- no overhead where nothing is sliced; one graph for equivalent calls ---------------------------------------

def test_nothing_sliced_runs_the_original_module():
    block, x = _block(), _x()
    compiled = fxstream.compile(block, budget_gb=64)
    out = compiled(x)
    assert compiled.compiled.runs_original and not compiled.plan.sliced_groups
    assert torch.equal(out, block(x))


@functools.cache
def _svd() -> models.BuiltModel:
    return models.build("svd", "tiny")


def test_return_dict_and_timestep_forms_share_one_graph():
    built = _svd()
    unet = built.module
    sample, timestep = built.args[:2]
    compiled = _compiled(unet)
    with torch.no_grad():
        ref = unet(*built.args, **built.kwargs).sample
        _assert_exact(compiled(*built.args, **built.kwargs).sample, ref)
        out = compiled(*built.args, **built.kwargs, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 1
        _assert_exact(out[0], ref)
        value = float(timestep)
        batch = sample.shape[0]
        for form in (torch.full((batch,), value), torch.tensor([value]), torch.tensor(int(value))):
            args = (sample, form, *built.args[2:])
            _assert_exact(compiled(*args, **built.kwargs).sample, unet(*args, **built.kwargs).sample)
    assert len(compiled._fx_cache) == 1


def test_the_compiled_signatures_are_bounded():
    block = _block()
    compiled = _compiled(block)
    for frames in range(1, MAX_SIGNATURES + 3):
        x = torch.randn(FRAMES * frames, 8, 4, 4)
        _assert_exact(compiled(x), block(x))
    assert len(compiled._fx_cache) == MAX_SIGNATURES


# -- diffusers' switches through the pipeline, after optimize ---------------------------------------------------

def _lora_state_dict(unet: nn.Module) -> dict:
    """A random LoRA on the attention projections, in the format ``load_lora_weights`` reads."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers.utils import convert_state_dict_to_diffusers

    scratch = copy.deepcopy(unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        scratch.add_adapter(LoraConfig(r=1, lora_alpha=1, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(scratch))
    return {f"unet.{k}": v for k, v in state.items()}


def test_lora_after_optimize_matches_the_plain_pipeline(animatediff, tmp_path):
    # with peft importable, which the suite's processes are not (tests/conftest.py); a plan cache of its own, as a
    # user's machine has: unloading the LoRA gives back the first graph, whose plan is replayed
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch; torch.set_num_threads(1); "
            f"from tests.test_guards import check_lora_after_optimize; check_lora_after_optimize({animatediff!r})")
    env = dict(os.environ, FXSTREAM_PLAN_CACHE="1", FXSTREAM_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def check_lora_after_optimize(animatediff: str) -> None:
    """LoRA (load, scale, disable, fuse, unload) through the pipeline after optimize, against the plain one."""
    plain, pipe = load(animatediff), load(animatediff)
    lora = _lora_state_dict(plain.unet)
    # a budget that slices (tests/pipes.py), plus room for the LoRA's weights, which the UNet holds once
    # loaded
    lora_gb = sum(t.numel() * t.element_size() for t in lora.values()) / 2**30
    result = fxstream.optimize(pipe, budget_gb=slicing_budget_gb(pipe) + lora_gb)
    assert pipe.unet is result.component("unet").original and installed(pipe.unet) is not None
    _assert_exact(unet_call(pipe), unet_call(plain))
    base = unet_call(plain)
    steps = [
        ("load", lambda p: p.load_lora_weights(dict(lora), adapter_name="style")),
        ("scale", lambda p: p.set_adapters(["style"], adapter_weights=[0.5])),
        ("disable", lambda p: p.disable_lora()),
        ("fuse", lambda p: (p.enable_lora(), p.fuse_lora(lora_scale=0.7))),
        ("unload", lambda p: p.unload_lora_weights()),
    ]
    for what, step in steps:
        step(plain)
        step(pipe)
        ref = unet_call(plain)
        _assert_exact(unet_call(pipe), ref)
        assert result.component("unet").module.plan.sliced_groups, f"{what}: not sliced"
        if what in ("load", "scale", "fuse"):
            assert (ref - base).abs().max() > 1e3 * RTOL * base.abs().max(), f"{what}: LoRA had no effect"
    assert pipe.get_list_adapters() == plain.get_list_adapters()
    compiled = result.component("unet").module
    assert compiled.plan.sliced_groups and compiled._fx_recompiles


def test_free_noise_after_optimize_matches_the_plain_pipeline(animatediff):
    plain, pipe = load(animatediff), load(animatediff)
    result = fxstream.optimize(pipe, "min")
    frames = 4
    _assert_exact(unet_call(pipe, frames), unet_call(plain, frames))
    before = unet_call(plain, frames)
    for p in (plain, pipe):
        p.enable_free_noise(context_length=2, context_stride=1)
    ref = unet_call(plain, frames)
    assert (ref - before).abs().max() > 1e3 * RTOL * before.abs().max(), "FreeNoise had no effect"
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxstream.errors.PlanningWarning)  # its frame weights' detach_ is a value
        _assert_exact(unet_call(pipe, frames), ref)
    plan = result.component("unet").module.plan
    assert plan.sliced_groups and not plan.notes


# -- backend="inductor" ----------------------------------------------------------------------------------------

def test_inductor_backend_compiles_each_body_once_and_stays_exact():
    from fxstream.runtime.inductor import InductorBody
    from tests.blocks import SpatialBlock

    torch.manual_seed(0)
    block = SpatialBlock(8).eval().requires_grad_(False)
    x = torch.randn(4, 8, 6, 6)
    compiled = fxstream.compile(block, chunks=2, backend="inductor")
    with torch.no_grad():
        _assert_exact(compiled(x), block(x))
        bodies = [m for m in compiled.compiled.graph_module.modules() if isinstance(m, InductorBody)]
        assert bodies and all(b._compiled is not None for b in bodies)
        generated = [b._compiled for b in bodies]
        _assert_exact(compiled(x + 1), block(x + 1))  # the same compiled code, every slice and call
        assert [b._compiled for b in bodies] == generated
    with pytest.raises(ValueError, match="backend"):
        fxstream.compile(block, backend="tvm")


class _Held(nn.Module):
    """No op of it can be sliced (cumsum has no rule), but eager holds ``a`` and ``b`` (local names) to the end,
    while the graph frees each value after its last use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.cumsum(0)
        b = a.cumsum(1)
        c = b.cumsum(0)
        return c.cumsum(1)


def test_at_the_least_memory_a_graph_that_frees_sooner_runs_though_it_slices_nothing():
    m, x = _Held(), torch.randn(64, 64)
    compiled = fxstream.compile(m)
    with torch.no_grad():
        eager = fxstream.measure(m, x)
        compiled(x)
        got = fxstream.measure(compiled, x)
    assert not compiled.plan.sliced_groups and not compiled.compiled.runs_original
    assert compiled.plan.predicted_peak_bytes < compiled.plan.baseline_peak_bytes
    assert got.activation_peak_bytes < eager.activation_peak_bytes
    assert torch.equal(got.output, eager.output)
