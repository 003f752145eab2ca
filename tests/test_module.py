"""StreamlinedModule is a drop-in: same calls and outputs, shared weights, one compiled graph per signature.

Run on the tiny SVD UNet (the flagship: every argument positional-or-keyword, ``return_dict`` last) and the
tiny AnimateDiff UNet (six optional arguments between ``encoder_hidden_states`` and ``return_dict``). Every
module is compiled with 3 forced slices so that every call runs sliced code.
"""

from __future__ import annotations

import functools
import inspect
import json

import pytest
import torch
from torch import nn

import fxstream
from fxstream import models
from fxstream.module import StreamlinedModule
from fxstream.runtime.sliced import SlicedCall
from passes.plan import Plan

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["svd", "animatediff"]
CHUNKS = 3
RTOL = 1e-5


def _sample(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _assert_exact(out, ref) -> None:
    out, ref = _sample(out), _sample(ref)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out - ref).abs().max().item()
    assert err <= RTOL * ref.abs().max().item(), f"max|out - ref| = {err:.3g}"


@functools.cache
def _build(name: str, **overrides) -> models.BuiltModel:
    return models.build(name, "tiny", **overrides)


@functools.cache
def _compiled(name: str) -> StreamlinedModule:
    """The shared compiled module of the seed-0 build. Tests that count compiles use their own."""
    return fxstream.compile(_build(name).module, chunks=CHUNKS)


def _eager(module: nn.Module, *args, **kwargs):
    with torch.no_grad():
        return module(*args, **kwargs)


def _all_keywords(built: models.BuiltModel) -> dict:
    return dict(inspect.signature(built.module.forward).bind(*built.args, **built.kwargs).arguments)


def _all_positional(built: models.BuiltModel, **extra) -> tuple:
    """Every argument up to the last one given, positionally, with the defaults in between."""
    bound = inspect.signature(built.module.forward).bind(*built.args, **built.kwargs, **extra)
    bound.apply_defaults()
    given = {**_all_keywords(built), **extra}
    names = list(bound.arguments)
    last = max(names.index(n) for n in given)
    return tuple(bound.arguments[n] for n in names[: last + 1])


# -- call forms and outputs ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_default_call_returns_the_output_dataclass(name):
    built = _build(name)
    ref = _eager(built.module, *built.args, **built.kwargs)
    out = _eager(_compiled(name), *built.args, **built.kwargs)
    assert type(out) is type(ref)
    assert isinstance(out.sample, torch.Tensor)
    _assert_exact(out, ref)
    assert _compiled(name).plan.sliced_groups


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_keyword_and_positional_calls_are_exact_and_share_one_graph(name):
    built = _build(name)
    compiled = _compiled(name)
    ref = _eager(built.module, *built.args, **built.kwargs)
    _eager(compiled, *built.args, **built.kwargs)
    entry, compiles = compiled.compiled, len(compiled._fx_cache)

    out = _eager(compiled, **_all_keywords(built))
    _assert_exact(out, ref)
    assert type(out) is type(ref)
    out = _eager(compiled, *_all_positional(built))
    _assert_exact(out, ref)
    assert type(out) is type(ref)
    assert len(compiled._fx_cache) == compiles
    assert compiled.compiled is entry


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, style",
    [
        ("svd", "keyword"),
        ("svd", "positional"),
        ("animatediff", "keyword"),
        ("animatediff", "positional"),
    ],
)
def test_return_dict_false_returns_a_tuple(name, style):
    built = _build(name)
    ref = _eager(built.module, *built.args, **built.kwargs, return_dict=False)
    assert type(ref) is tuple
    if style == "keyword":
        out = _eager(_compiled(name), *built.args, **built.kwargs, return_dict=False)
    else:
        out = _eager(_compiled(name), *_all_positional(built, return_dict=False))
    assert type(out) is tuple and len(out) == len(ref)
    _assert_exact(out[0], ref[0])


@pytest.mark.slow
def test_keyword_arguments_after_skipped_defaults_reach_the_graph():
    """ControlNet's mid-block residual, passed by keyword with the optional arguments before it left out, must
    change the output exactly as it changes the original's."""
    built = _build("animatediff")
    sample = built.args[0]
    batch, _, frames, h, w = sample.shape
    channels = built.module.config.block_out_channels[-1]
    generator = torch.Generator().manual_seed(5)
    residual = torch.randn(batch * frames, channels, h // 2, w // 2, generator=generator)
    plain = _eager(built.module, *built.args, **built.kwargs)
    ref = _eager(built.module, *built.args, **built.kwargs, mid_block_additional_residual=residual)
    assert not torch.allclose(ref.sample, plain.sample)
    compiled = _compiled("animatediff")
    out = _eager(compiled, *built.args, **built.kwargs, mid_block_additional_residual=residual)
    _assert_exact(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_python_number_timestep_is_not_specialised(name):
    """A python-number timestep becomes a 0-d tensor: one graph serves every step and stays exact."""
    built = _build(name)
    compiled = fxstream.compile(built.module, chunks=CHUNKS)
    sample, _ = built.args
    step = 1.5 if name == "svd" else 981  # Euler steps are floats, DDIM steps ints
    ref = _eager(built.module, sample, step, **built.kwargs)
    _assert_exact(_eager(compiled, sample, step, **built.kwargs), ref)
    assert len(compiled._fx_cache) == 1
    entry = compiled.compiled

    later = 0.25 if name == "svd" else 21
    ref = _eager(built.module, sample, later, **built.kwargs)
    _assert_exact(_eager(compiled, sample, later, **built.kwargs), ref)
    assert len(compiled._fx_cache) == 1
    assert compiled.compiled is entry


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_input_of_the_same_shape_is_exact(name):
    """Same shape, other strides (a transposed copy transposed back): the graph compiled for contiguous input
    runs, exactly."""
    built = _build(name)
    compiled = _compiled(name)
    ref = _eager(built.module, *built.args, **built.kwargs)
    sample = built.args[0]
    strided = sample.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not strided.is_contiguous()
    _assert_exact(_eager(compiled, strided, *built.args[1:], **built.kwargs), ref)


# -- compile cache -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_same_shapes_reuse_the_graph_and_new_shapes_recompile(name):
    built = _build(name)
    compiled = fxstream.compile(built.module, chunks=CHUNKS)
    assert compiled.plan is None and compiled.compiled is None
    ref = _eager(built.module, *built.args, **built.kwargs)
    _assert_exact(_eager(compiled, *built.args, **built.kwargs), ref)
    first = compiled.compiled
    assert len(compiled._fx_cache) == 1

    # Same shapes, new values (the seed-1 inputs): the graph compiled for the first call runs again.
    other = _build(name, seed=1)
    ref = _eager(built.module, *other.args, **other.kwargs)
    _assert_exact(_eager(compiled, *other.args, **other.kwargs), ref)
    assert len(compiled._fx_cache) == 1
    assert compiled.compiled is first

    # 3 frames, then a non-square 64x96 video (8x12 latents): each is a new signature, compiled and exact.
    for count, shape in ((2, {"frames": 3}), (3, {"height": 64, "width": 96})):
        new = _build(name, **shape)
        ref = _eager(built.module, *new.args, **new.kwargs)
        out = _eager(compiled, *new.args, **new.kwargs)
        _assert_exact(out, ref)
        assert len(compiled._fx_cache) == count
        assert compiled.compiled is not first
        assert compiled.plan.signature != first.plan.signature
        assert any(isinstance(m, SlicedCall) for m in compiled.compiled.graph_module.modules())

    # Back to the first shapes: no compile, and .plan describes that signature again.
    _eager(compiled, *built.args, **built.kwargs)
    assert len(compiled._fx_cache) == 3
    assert compiled.compiled is first
    assert compiled.plan is first.plan


# -- attributes and weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_exposes_the_original_config_dtype_and_device(name):
    module = _build(name).module
    compiled = fxstream.compile(module, chunks=CHUNKS)
    assert isinstance(compiled, nn.Module)
    assert compiled.original is module
    assert compiled.config is module.config
    assert compiled.config.in_channels == module.config.in_channels
    assert compiled.dtype == module.dtype == torch.float32
    assert compiled.device == module.device == torch.device("cpu")
    assert compiled.conv_in is module.conv_in  # submodules the pipelines read (e.g. add_embedding in SVD)
    with pytest.raises(AttributeError):
        compiled.no_such_attribute  # noqa: B018


def test_svd_pipeline_attributes():
    module = _build("svd").module
    compiled = fxstream.compile(module)
    # StableVideoDiffusionPipeline._get_add_time_ids reads these.
    assert compiled.add_embedding.linear_1.in_features == module.add_embedding.linear_1.in_features
    assert compiled.config.addition_time_embed_dim == module.config.addition_time_embed_dim


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_shared_not_copied(name):
    built = _build(name)
    module, compiled = built.module, _compiled(name)
    _eager(compiled, *built.args, **built.kwargs)
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in module.parameters()}
    assert sum(p.numel() for p in compiled.parameters()) == sum(p.numel() for p in module.parameters())
    originals = {t.data_ptr() for t in module.state_dict().values()}
    graph_state = compiled.compiled.graph_module.state_dict()
    assert graph_state
    assert all(t.data_ptr() in originals for t in graph_state.values())

    # An in-place edit of the original's weights is seen by the compiled graph.
    bias = module.conv_out.bias
    with torch.no_grad():
        bias.add_(1.0)
    try:
        ref = _eager(module, *built.args, **built.kwargs)
        _assert_exact(_eager(compiled, *built.args, **built.kwargs), ref)
    finally:
        with torch.no_grad():
            bias.sub_(1.0)


@pytest.mark.slow
def test_to_dtype_converts_the_shared_weights_and_recompiles():
    built = models.build("svd", "tiny", seed=3)
    module = built.module
    compiled = fxstream.compile(module, chunks=CHUNKS)
    assert compiled.to(torch.float64) is compiled
    assert module.dtype == compiled.dtype == torch.float64
    args = tuple(a.double() if a.is_floating_point() else a for a in built.args)
    kwargs = {k: v.double() if v.is_floating_point() else v for k, v in built.kwargs.items()}
    out = _eager(compiled, *args, **kwargs)
    assert out.sample.dtype == torch.float64
    _assert_exact(out, _eager(module, *args, **kwargs))


def test_compiling_a_compiled_module_wraps_the_original():
    module = _build("svd").module
    compiled = fxstream.compile(module)
    again = fxstream.compile(compiled, chunks=2)
    assert again.original is module


# -- plan and report -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plan_json_round_trips(tmp_path):
    built = _build("svd")
    compiled = _compiled("svd")
    _eager(compiled, *built.args, **built.kwargs)
    plan = compiled.plan
    text = plan.to_json()
    assert json.loads(text)["predicted_peak_bytes"] == plan.predicted_peak_bytes
    assert Plan.from_json(text) == plan

    path = tmp_path / "plan.json"
    assert plan.to_json(path) == text
    assert Plan.from_json(path) == plan
    assert Plan.from_json(str(path)) == plan
    loaded = Plan.from_json(path)
    assert loaded.sliced_groups == plan.sliced_groups and loaded.sliced_groups
    assert loaded.chunks() == plan.chunks()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_report_names_baseline_and_planned_memory(name, capsys):
    built = _build(name)
    compiled = _compiled(name)
    _eager(compiled, *built.args, **built.kwargs)
    capsys.readouterr()
    text = compiled.report()
    assert isinstance(text, str)
    assert "baseline" in text and "planned" in text
    assert any(g.name in text for g in compiled.plan.sliced_groups)
    assert capsys.readouterr().out == ""  # returned, not printed: print(compiled.report()) shows it once


def test_before_the_first_call_there_is_no_plan():
    compiled = fxstream.compile(nn.Linear(4, 4))
    assert compiled.plan is None
    assert compiled.compiled is None
    assert "not compiled" in compiled.report()


def test_measuring_the_first_call_does_not_count_the_compile():
    built = models.build("sd-vae-decoder", "tiny")
    compiled = fxstream.compile(built.module, chunks=2)
    first = fxstream.measure(compiled, *built.args, **built.kwargs).activation_peak_bytes
    second = fxstream.measure(compiled, *built.args, **built.kwargs).activation_peak_bytes
    assert first == second
