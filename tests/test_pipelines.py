"""``fxstream.optimize`` on whole diffusers pipelines: exact frames under one shared budget, chunked decodes,
drop-in behaviour, clear errors.

Every pipeline is built tiny from configs (``fxstream.pipelines.build``: the zoo's tiny UNet and VAE, tiny
CLIP encoders, a byte-level tokenizer made locally), saved with ``save_pretrained`` and loaded back with
``DiffusionPipeline.from_pretrained``, as a user loads a real one. fp32 on the CPU, 2 denoising steps.

One budget covers the whole pipeline, so a budget that makes both the UNet and the VAE decoder slice must lie
above both components' smallest reachable whole-pipeline peaks (learnt from a first run at the minimum,
``budget_gb=None``) and below both their unsliced peaks: the test takes 1% above the larger floor. For SVD the
tiny UNet's activations are far below those of the zoo's tiny VAE decoder decoding 4 frames at 64x64 (32-64
channels at 8x8 latents against 32 channels at 64x64 pixels): its unsliced peak stays below the decoder's
floor. So SVD makes 20 frames and decodes them 4 at a time (``decode_chunk_size``), as a memory-bound user
would; the AnimateDiff and ModelScope windows overlap at 4 frames.
"""

from __future__ import annotations

import functools

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

import fxstream
from fxstream import pipelines
from fxstream.errors import BudgetError, UnsupportedModelError
from fxstream.module import installed
from fxstream.pipelines import PipelineOptimization

pytestmark = pytest.mark.usefixtures("one_thread")

GIB = 2**30
STEPS = 2
# Per pipeline: frames, (height, width) in pixels (8x8 latents), extra pipeline arguments.
CALLS = {
    "svd": (20, (64, 64), {"decode_chunk_size": 4}),
    "animatediff": (4, (64, 64), {}),
    "modelscope": (4, (64, 64), {}),
}
NAMES = tuple(CALLS)  # the DiT-era pipelines: tests/test_optimize_dit.py
FRAMES = 4  # decode tests
# How far above the larger of the two components' floors the shared budget is set.
BUDGET_MARGIN = 0.01
# Frames are floats in [0, 1] after two denoising steps and a decode: float reordering stays far below this.
ATOL = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """Folder of each saved tiny pipeline."""
    folders = {}
    for name in NAMES:
        folder = tmp_path_factory.mktemp(name)
        pipelines.build(name).save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def _load(folder: str) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def _image(height: int, width: int) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8))


def _generate(pipe: DiffusionPipeline, name: str) -> np.ndarray:
    frames, (height, width), extra = CALLS[name]
    call = dict(num_frames=frames, height=height, width=width, num_inference_steps=STEPS, output_type="np",
                generator=torch.Generator().manual_seed(0), **extra)
    if name == "svd":
        return np.asarray(pipe(_image(height, width), **call).frames)
    return np.asarray(pipe("a fox in the snow", **call).frames)


def _floors(result: PipelineOptimization) -> dict[str, int]:
    """Per component: the smallest reachable whole-pipeline peak of its one compiled signature."""
    out = {}
    for c in result.components:
        [(_, _, planned)] = c.pipeline_peaks()
        out[c.path] = planned
    return out


@pytest.mark.parametrize("name", NAMES)
def test_optimize_exact_under_shared_budget(saved, name):
    pipe = _load(saved[name])
    reference = _generate(pipe, name)
    frames, size, _ = CALLS[name]
    assert reference.shape == (1, frames, *size, 3)

    # Minimum memory: exact, and each component's floor.
    minimum = fxstream.optimize(pipe, "min")
    np.testing.assert_allclose(_generate(pipe, name), reference, rtol=0, atol=ATOL)
    floors = _floors(minimum)
    assert set(floors) == {"unet", "vae.decoder"}
    budget = int(max(floors.values()) * (1 + BUDGET_MARGIN))

    result = fxstream.optimize(pipe, budget_gb=budget / GIB)
    assert installed(pipe.unet) is result.component("unet").module
    assert installed(pipe.vae.decoder) is result.component("vae.decoder").module
    np.testing.assert_allclose(_generate(pipe, name), reference, rtol=0, atol=ATOL)
    for c in result.components:
        assert c.other_weight_bytes + c.weight_bytes == result.resident_weight_bytes
        assert c.budget_bytes == result.budget_bytes - c.other_weight_bytes
        assert c.compiled_signatures == 1  # SVD's five 4-frame decode chunks share one graph
        assert c.module.plan.sliced_groups, f"{name}: {c.path} was not sliced at {budget} bytes ({floors})"
        [(_, baseline, planned)] = c.pipeline_peaks()
        assert planned <= result.budget_bytes < baseline


@functools.cache
def _latents(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def test_decode_chunks_compile_once_per_shape(saved):
    # AnimateDiff decodes decode_chunk_size frames per VAE call: 3 + 1 frames are two signatures.
    pipe = _load(saved["animatediff"])
    latents = _latents((1, 4, FRAMES, 8, 8))
    reference = pipe.decode_latents(latents, decode_chunk_size=3)
    result = fxstream.optimize(pipe, "min")
    for _ in range(2):
        with torch.no_grad():  # as in the pipeline's call (with grad the original would run)
            decoded = pipe.decode_latents(latents, decode_chunk_size=3)
        torch.testing.assert_close(decoded, reference, rtol=0, atol=ATOL)
    assert result.component("vae.decoder").compiled_signatures == 2


def test_vae_slicing(saved):
    # AutoencoderKL.enable_slicing decodes one frame per decoder call.
    pipe = _load(saved["modelscope"])
    pipe.vae.enable_slicing()
    latents = _latents((1, 4, FRAMES, 8, 8))
    reference = pipe.decode_latents(latents)
    result = fxstream.optimize(pipe, "min")
    with torch.no_grad():
        torch.testing.assert_close(pipe.decode_latents(latents), reference, rtol=0, atol=ATOL)
    decoder = result.component("vae.decoder")
    assert decoder.compiled_signatures == 1
    assert decoder.module.plan.signature.startswith("float32[1, 4, 8, 8]")


def test_drop_in_and_restore(saved, tmp_path):
    pipe = _load(saved["modelscope"])
    unet, decoder = pipe.unet, pipe.vae.decoder
    config = {k: v for k, v in pipe.config.items() if not k.startswith("_")}  # the components' classes
    keys = set(pipe.vae.state_dict())
    first = fxstream.optimize(pipe, "min")
    # the components stay the very modules they were: only their calls run the compiled graphs
    assert pipe.unet is unet and pipe.vae.decoder is decoder and pipe.components["unet"] is unet
    assert installed(unet).original is unet and installed(decoder).original is decoder
    assert set(pipe.vae.state_dict()) == keys
    assert {k: v for k, v in pipe.config.items() if k in config} == config  # still the diffusers classes

    second = fxstream.optimize(pipe, budget_gb=1)  # recompiles from the originals, never wraps a wrapper
    assert installed(unet) is second.component("unet").module and installed(unet).original is unet
    assert first.components == []  # the first optimization was undone
    assert second.resident_weight_bytes == first.resident_weight_bytes

    # Saving an optimized pipeline saves the plain components, and leaves it optimized.
    pipe.save_pretrained(tmp_path / "optimized")
    assert installed(pipe.unet) is second.component("unet").module
    assert {k: v for k, v in pipe.config.items() if k in config} == config
    loaded = _load(str(tmp_path / "optimized"))
    assert type(loaded.unet) is type(unet) and installed(loaded.unet) is None
    torch.testing.assert_close(loaded.vae.decoder.state_dict(), decoder.state_dict(), rtol=0, atol=0)

    # A module compiled with fxstream.compile and set on the pipeline is optimized from its original.
    pipe.unet = fxstream.compile(unet)
    third = fxstream.optimize(pipe, "min")
    assert pipe.unet is unet and installed(unet) is third.component("unet").module

    third.restore()
    assert pipe.unet is unet and pipe.vae.decoder is decoder and set(pipe.vae.state_dict()) == keys
    assert installed(unet) is None and installed(decoder) is None


def test_budget_below_resident_weights(saved):
    pipe = _load(saved["animatediff"])
    resident = sum(p.numel() * p.element_size() for m in pipe.components.values()
                   if isinstance(m, torch.nn.Module) for p in m.parameters())
    with pytest.raises(BudgetError, match="does not cover the weights") as e:
        fxstream.optimize(pipe, budget_gb=resident / 2 / GIB)
    assert e.value.min_peak_bytes >= resident
    assert installed(pipe.unet) is None  # nothing was compiled

    first = fxstream.optimize(pipe, "min")
    with pytest.raises(BudgetError):
        fxstream.optimize(pipe, budget_gb=resident / 2 / GIB)
    assert installed(pipe.unet) is first.component("unet").module  # the earlier optimization stands


def test_unmet_budget_names_the_pipeline(saved):
    pipe = _load(saved["modelscope"])
    result = fxstream.optimize(pipe, "min")
    # Room for the weights and barely any activations: the decoder cannot fit its share.
    tight = fxstream.optimize(pipe, budget_gb=(result.resident_weight_bytes + 1024) / GIB)
    with pytest.raises(BudgetError, match=r"TextToVideoSDPipeline does not fit .* while vae.decoder") as e, \
            torch.no_grad():
        pipe.decode_latents(_latents((1, 4, FRAMES, 8, 8)))
    decoder = tight.component("vae.decoder")
    assert e.value.min_peak_bytes > decoder.other_weight_bytes + decoder.weight_bytes


@pytest.mark.parametrize("name", ["svd", "animatediff"])
def test_optimize_with_rehash_restarts_every_call(saved, name):
    pipe = _load(saved[name])
    steps = 5
    frames, (height, width), extra = CALLS[name]
    call = dict(num_frames=frames, height=height, width=width, num_inference_steps=steps, output_type="np",
                **extra)
    source = _image(height, width) if name == "svd" else "a fox in the snow"

    def run(seed: int) -> np.ndarray:
        return np.asarray(pipe(source, generator=torch.Generator().manual_seed(seed), **call).frames)

    # a budget everything fits unsliced in: the controller's restarts are the point, not the slicing (planned once)
    result = fxstream.optimize(pipe, budget_gb=1024, rehash=fxstream.Schedule.interval(3))
    first = run(0)
    # steps counted from the scheduler's timesteps: 0 and 3 by the schedule, 4 because it is the last
    assert result.rehash.history == [(0, True), (1, False), (2, False), (3, True), (4, True)]
    run(1)
    assert np.array_equal(run(0), first)  # each call starts over: nothing leaks from the call before
    assert result.rehash.full_steps_run == [0, 3, 4]
    result.restore()
    assert "set_timesteps" not in pipe.scheduler.__dict__ and installed(pipe.unet) is None


def test_arguments(saved):
    pipe = _load(saved["modelscope"])
    with pytest.raises(ValueError, match="rehash must be"):
        fxstream.optimize(pipe, rehash=3)
    for bad in (0, -1, "8", True, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="budget_gb"):
            fxstream.optimize(pipe, budget_gb=bad)
    with pytest.raises(ValueError, match="target"):
        fxstream.optimize(pipe, target="tpu")
    assert installed(pipe.unet) is None


def test_unsupported_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(UnsupportedModelError) as e:
        fxstream.optimize(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))
    message = str(e.value)
    assert "DDPMPipeline" in message
    assert all(name in message for name in pipelines.SUPPORTED_PIPELINES)


def test_build_arguments():
    with pytest.raises(ValueError, match="unknown pipeline"):
        pipelines.build("sdxl")
    with pytest.raises(ValueError, match="size"):
        pipelines.build("svd", "huge")
    with pytest.raises(ValueError, match="size"):
        pipelines.build("wan", "full")  # the DiT-era pipelines: tiny only
    with pytest.raises(ValueError, match="dtype"):
        pipelines.build("svd", dtype=torch.int8)


@pytest.mark.parametrize("name, unet_params", [("svd", 1_524_623_082), ("svd-xt", 1_524_623_082),
                                               ("modelscope", 1_411_233_860)])
def test_full_size_pipelines_on_meta(name, unet_params):
    # The released architectures, no memory: the planning side of fxstream.plan_pipeline.
    pipe = pipelines.build(name, "full")
    for module in pipelines._pipeline_modules(pipe):
        assert {p.device.type for p in module.parameters()} == {"meta"}
        assert {p.dtype for p in module.parameters()} == {torch.float16}
    assert sum(p.numel() for p in pipe.unet.parameters()) == unet_params
    if name == "svd-xt":
        assert pipe.unet.config.num_frames == 25


def test_optimize_with_offload_keeps_the_frames(saved):
    # optimize(pipe, offload=...) turns on diffusers' model CPU offload (accelerate's hooks) and compiles under
    # it; on this CPU the hooks run around each compiled call (offloading to the CPU moves nothing).
    pipe = _load(saved["animatediff"])
    reference = _generate(pipe, "animatediff")
    result = fxstream.optimize(pipe, offload="cpu")
    assert "_hf_hook" in pipe.unet.__dict__ and "_hf_hook" in pipe.vae.__dict__
    np.testing.assert_allclose(_generate(pipe, "animatediff"), reference, rtol=0, atol=ATOL)
    assert result.component("unet").compiled_signatures == 1
    assert result.component("vae.decoder").compiled_signatures == 1
