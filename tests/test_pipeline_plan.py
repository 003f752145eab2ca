"""fxstream.plan_pipeline and ``fxstream plan --pipeline``: a whole pipeline's phases, its peak and the fits line.

The arithmetic is checked on tiny pipelines (target cpu: no allowance) and the command on the full-size SVD
pipeline on meta at a small video size (the real architectures, seconds).
"""

from __future__ import annotations

import json

import pytest
import torch

from fxstream import cli, pipeline_plan, pipelines
from fxstream.pipeline_plan import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, plan_pipeline, tensor_budget_bytes

GIB = 2**30
SMALL = dict(frames=2, height=32, width=32)


@pytest.fixture(scope="module")
def svd_pipe():
    return pipelines.build("svd")


@pytest.fixture(scope="module")
def svd_min(svd_pipe):
    return plan_pipeline(svd_pipe, target="cpu", **SMALL)


def _weights(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_phases_and_the_pipeline_peak(svd_pipe, svd_min):
    plan = svd_min
    assert [p.name for p in plan.phases] == ["image encoder", "VAE encode", "denoiser step", "VAE decode"]
    assert [p.compiled for p in plan.phases] == [False, False, True, True]
    assert plan.components == {n: _weights(m) for n, m in svd_pipe.components.items()
                               if isinstance(m, torch.nn.Module)}
    for p in plan.phases:  # no offload: every component is resident in every phase
        assert p.other_weight_bytes + p.own_weight_bytes == plan.resident_weight_bytes
        assert p.eager_activation_bytes > 0
    decoder = plan.phases[-1]
    assert decoder.own_weight_bytes == _weights(svd_pipe.vae.decoder)
    # the pipeline's peak: every resident weight plus the largest phase's activations, eager and fxstream
    assert plan.eager_peak_bytes == plan.resident_weight_bytes + max(p.eager_activation_bytes for p in plan.phases)
    activations = [p.eager_activation_bytes if not p.compiled else p.planned_activation_bytes for p in plan.phases]
    assert plan.peak_bytes == plan.resident_weight_bytes + max(activations)
    assert plan.peak_bytes < plan.eager_peak_bytes
    for p in plan.phases[2:]:  # with no budget the compiled phases are at their minimum, sliced
        assert p.sliced_groups and p.planned_activation_bytes == p.floor_activation_bytes
        assert p.planned_activation_bytes < p.eager_activation_bytes
    assert plan.fits is None and plan.least_bytes == plan.peak_bytes  # target cpu: no allowance
    assert plan.bounding_phase.least_bytes == plan.peak_bytes


def test_fits_under_a_budget_and_names_the_bound(svd_pipe, svd_min):
    enough = plan_pipeline(svd_pipe, budget_gb=svd_min.eager_peak_bytes / GIB, target="cpu", **SMALL)
    assert enough.fits and enough.eager_fits
    assert "fits in" in enough.fits_line() and ": yes" in enough.fits_line()
    assert all(p.sliced_groups == 0 for p in enough.phases)  # room for eager: nothing sliced

    below = int(svd_min.least_bytes * 0.9)
    short = plan_pipeline(svd_pipe, budget_gb=below / GIB, target="cpu", **SMALL)
    assert short.fits is False and short.peak_bytes is None
    assert short.least_bytes == svd_min.least_bytes
    assert ": no" in short.fits_line() and short.bounding_phase.name in short.bound
    failed = [p for p in short.phases if p.compiled and p.planned_activation_bytes is None]
    assert failed and all(p.floor_activation_bytes is not None for p in failed)


def test_offload_keeps_only_the_running_component(svd_pipe, svd_min):
    plan = plan_pipeline(svd_pipe, offload=True, target="cpu", **SMALL)
    w = plan.components
    for p in plan.phases:
        assert p.other_weight_bytes + p.own_weight_bytes == w[p.component]
    # each component moves to the device when its phase starts: the VAE twice (encode, then decode after the UNet)
    assert plan.offload_bytes == w["image_encoder"] + w["vae"] + w["unet"] + w["vae"]
    assert plan.peak_bytes < svd_min.peak_bytes


def test_decode_chunks_hold_the_frames_already_decoded(svd_pipe):
    plan = plan_pipeline(svd_pipe, target="cpu", decode_chunk_size=1, **SMALL)
    decoder = plan.phases[-1]
    assert plan.decode_chunk_size == 1 and "2 calls" in decoder.calls
    assert decoder.held_bytes == 3 * 32 * 32 * 4  # one fp32 RGB frame of the first call


def test_cuda_allowance():
    budget = 8 * GIB
    tensors = tensor_budget_bytes(budget, "cuda")
    assert tensors == int((budget - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK))
    assert tensor_budget_bytes(budget, "cpu") == budget


@pytest.mark.parametrize("kwargs, match", [
    (dict(frames=0), "frames"), (dict(height=60), "height"), (dict(decode_chunk_size=-1), "decode_chunk_size"),
    (dict(target="tpu"), "target"), (dict(budget_gb=-1), "budget_gb"),
])
def test_bad_arguments(svd_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_pipeline(svd_pipe, **kwargs)


def test_unknown_pipeline():
    with pytest.raises(ValueError, match="unknown pipeline"):
        plan_pipeline("sdxl")


def test_cli_lists_the_pipelines():
    assert cli.PIPELINES == tuple(pipeline_plan.PIPELINE_DEFAULTS)


def test_cli_plans_the_full_size_pipeline(capsys, tmp_path):
    # The released SVD pipeline's architectures on meta (UNet 1.5 B, CLIP ViT-H, VAE), at a small video size.
    path = tmp_path / "plan.json"
    code = cli.main(["plan", "--pipeline", "svd", "--frames", "2", "--height", "64", "--width", "64",
                     "--budget-gb", "8", "--json", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(path.read_text())
    assert set(data["components"]) == {"vae", "image_encoder", "unet"}
    clip_h = 632_076_800 * 2  # CLIP ViT-H/14's parameters in fp16, and its position ids
    assert clip_h < data["components"]["image_encoder"] < clip_h + 2**12
    assert [p["name"] for p in data["phases"]] == ["image encoder", "VAE encode", "denoiser step", "VAE decode"]
    assert data["fits"] is True and data["tensor_budget_bytes"] == tensor_budget_bytes(8 * GIB)
    largest = max(p["eager_activation_bytes"] if not p["compiled"] else p["planned_activation_bytes"]
                  for p in data["phases"])
    assert data["peak_bytes"] >= data["resident_weight_bytes"] + largest
    assert data["eager_peak_bytes"] >= data["resident_weight_bytes"] + max(
        p["eager_activation_bytes"] for p in data["phases"])
    for line in ("| image encoder", "| VAE encode", "| denoiser step", "| VAE decode", "whole pipeline peak:",
                 "fits in 8.00 GiB: yes", "fxstream.optimize(pipe, budget_gb="):
        assert line in out
    for label in ("planning image encoder", "planning VAE decode"):
        assert label in err


@pytest.mark.parametrize("argv, match", [
    (["plan", "--offload"], "--offload: only with --pipeline"),
    (["plan", "--decode-chunk-size", "2"], "--decode-chunk-size: only with --pipeline"),
    (["plan", "--pipeline", "svd", "--model", "svd"], "not allowed with --model"),
    (["plan", "--pipeline", "svd", "--chunks", "2"], "--chunks: not allowed with --pipeline"),
    (["plan", "--pipeline", "sdxl"], "invalid choice"),
    (["plan", "--budget-gb", "lots"], "positive number"),
])
def test_cli_argument_errors(capsys, argv, match):
    assert cli.main(argv) == 2
    _, err = capsys.readouterr()
    assert match in err and err.count("\n") == 1


def test_cli_min_budget(capsys):
    code = cli.main(["plan", "--model", "sd-vae-decoder", "--size", "tiny", "--budget-gb", "min"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "planning sd-vae-decoder (tiny, cpu) for the minimum" in err
    assert "sliced operator groups" in out


def test_auto_budget_on_the_cpu(monkeypatch):
    # On the CPU the loaded weights are already out of the available RAM: they are added back.
    monkeypatch.setattr(pipeline_plan, "_available_ram", lambda: 10 * GIB)
    assert pipeline_plan.auto_budget_bytes("cpu", 3 * GIB) == int(10 * GIB * pipeline_plan.CPU_AUTO_FRACTION) + 3 * GIB


def test_optimize_defaults_to_the_auto_budget(monkeypatch, capsys):
    import fxstream

    monkeypatch.setattr(pipeline_plan, "_available_ram", lambda: 2 * GIB)
    pipe = pipelines.build("modelscope")
    result = fxstream.optimize(pipe)
    assert result.budget_bytes == int(2 * GIB * pipeline_plan.CPU_AUTO_FRACTION) + result.resident_weight_bytes
    assert "fxstream: budget auto: " in capsys.readouterr().err
    assert fxstream.optimize(pipe, "min").budget_bytes is None
    assert fxstream.optimize(pipe, None).budget_bytes is None


def test_min_is_no_budget():
    from fxstream.api import budget_bytes_of

    assert budget_bytes_of("min") is None and budget_bytes_of(None) is None
    with pytest.raises(ValueError, match="or 'min'"):
        budget_bytes_of("max")


def test_the_wan_pipeline_phases():
    # WanPipeline: the UMT5 prompt, the transformer (batch 1, called twice a step for guidance), the whole decode.
    pipe = pipelines.build("wan")
    plan = plan_pipeline(pipe, target="cpu", frames=9, height=32, width=32)
    assert [(p.name, p.component, p.compiled) for p in plan.phases] == [
        ("text encoder", "text_encoder", False), ("denoiser step", "transformer", True),
        ("VAE decode", "vae", True)]
    assert "twice a step" in plan.phases[1].calls
    assert plan.peak_bytes == plan.resident_weight_bytes + max(
        p.eager_activation_bytes if not p.compiled else p.planned_activation_bytes for p in plan.phases)
    with pytest.raises(ValueError, match="decode_chunk_size"):
        plan_pipeline(pipe, decode_chunk_size=2)
    with pytest.raises(ValueError, match="frames - 1"):
        plan_pipeline(pipe, frames=10)


@pytest.mark.parametrize("name, shape", [("ltx", (9, 128, 128)), ("cogvideox", (9, 64, 64)), ("mochi", (7, 64, 64))])
def test_the_t5_pipelines_phases(name, shape):
    # LTX-Video, CogVideoX, Mochi: a T5 prompt, one transformer call of the guidance batch 2, the whole decode (at
    # the zoo's tiny sizes: CogVideoX's tiny transformer has positional tables for 64x64).
    pipe = pipelines.build(name)
    frames, height, width = shape
    plan = plan_pipeline(pipe, target="cpu", frames=frames, height=height, width=width)
    assert [p.component for p in plan.phases] == ["text_encoder", "transformer", "vae"]
    assert "batch 2 for guidance" in plan.phases[1].calls
    assert plan.peak_bytes is not None and plan.peak_bytes < plan.eager_peak_bytes


def test_the_released_wan_pipeline_on_meta():
    pipe = pipelines.build("wan2.1-1.3b", "full", dtype=torch.bfloat16)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in pipe.components.items()
              if isinstance(m, torch.nn.Module)}
    assert 5.6e9 < params["text_encoder"] < 5.8e9  # UMT5-XXL: the pipeline's largest weights
    assert 1.3e9 < params["transformer"] < 1.5e9
    for name in ("ltx-video", "cogvideox-5b", "mochi"):  # T5-XXL's encoder
        encoder = pipelines.build(name, "full").text_encoder
        assert 4.7e9 < sum(p.numel() for p in encoder.parameters()) < 4.8e9
