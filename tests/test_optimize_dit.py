"""``fxstream.optimize`` on the DiT-era pipelines (Wan T2V and I2V, HunyuanVideo, LTX-Video, CogVideoX, Mochi): the
transformer (sliced along its tokens) and the VAE's whole decode (row-streamed) compiled in place under one shared
budget, and the frames the plain pipeline makes. Tiny pipelines from ``fxstream.pipelines.build``; each is compared with itself before optimize (a saved and
reloaded copy rounds differently: its weights sit at other addresses)."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fxstream
from fxstream import dit_pipelines, pipelines
from fxstream.pipelines import CompiledDecode

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = dit_pipelines.NAMES
FRAMES = {"mochi": 7}  # Mochi's VAE makes 6T - 5 frames; the others 4T - 3 (9 from 3 latent frames)
# Wan's tiny VAE has the real 8x: at 32x32 its transformer sees 12 video tokens beside 16 of text, too few to slice
SIZE = {"wan": 64}
# Frames are floats in [0, 1] after two denoising steps and a decode: float reordering stays far below this.
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _plan_cache(tmp_path_factory):
    """One plan cache for the module, as one user's machine has: Wan's text-to-video and image-to-video
    pipelines share their VAE, so the second decode replays the first one's plan instead of planning again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXSTREAM_PLAN_CACHE", "1")
        mp.setenv("FXSTREAM_CACHE_DIR", str(tmp_path_factory.mktemp("plans")))
        yield


@pytest.fixture(autouse=True)
def _ftfy(monkeypatch):
    """WanImageToVideoPipeline calls ``ftfy.fix_text`` even where ftfy is not installed (diffusers 0.42,
    pipeline_wan_i2v.py ``basic_clean``); without it, leave the text as WanPipeline does."""
    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):
        monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)


def _generate(pipe, name: str) -> np.ndarray:
    size = SIZE.get(name, 32)
    call = dict(prompt="a red fox", num_frames=FRAMES.get(name, 9), height=size, width=size, num_inference_steps=2,
                max_sequence_length=dit_pipelines.TEXT_SEQ_LEN, output_type="np",
                generator=torch.Generator().manual_seed(0))
    if name == "wan-i2v":
        call["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return np.asarray(pipe(**call).frames)


def _build(name: str):
    pipe = pipelines.build(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", NAMES)
def test_optimize_streams_the_vae_decode_and_keeps_the_frames(name):
    pipe = _build(name)
    reference = _generate(pipe, name)
    size = SIZE.get(name, 32)
    assert reference.shape == (1, FRAMES.get(name, 9), size, size, 3)
    vae, transformer = pipe.vae, pipe.transformer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HunyuanVideo's framewise decoding is on by default: see the test below
        result = fxstream.optimize(pipe, "min")
    assert [c.path for c in result.components] == ["transformer", "vae.decode"]
    denoiser, component = result.components
    assert component.original.vae is vae and isinstance(vae.decode, CompiledDecode)
    assert pipe.transformer is transformer and denoiser.original is transformer  # the very module, compiled
    np.testing.assert_allclose(_generate(pipe, name), reference, rtol=0, atol=ATOL)
    plan = component.module.plan
    assert [g for g in plan.groups if g.kind == "rows" and g.slices > 1], f"{name}: the decode was not streamed"
    assert plan.predicted_activation_peak_bytes < plan.baseline_activation_peak_bytes
    plan = denoiser.module.plan
    assert plan.sliced_groups, f"{name}: the transformer was not sliced"
    assert plan.predicted_activation_peak_bytes < plan.baseline_activation_peak_bytes
    for c in result.components:  # one budget: each component's share leaves room for the other's weights
        assert c.weight_bytes + c.other_weight_bytes == result.resident_weight_bytes
    assert "vae.decode" in result.report() and "transformer" in result.report()

    # restore puts the VAE's own decode back (the class's method, no instance attribute) and the transformer's call
    result.restore()
    assert "decode" not in vae.__dict__
    assert fxstream.module.installed(transformer) is None
    np.testing.assert_allclose(_generate(pipe, name), reference, rtol=0, atol=ATOL)


def test_a_budget_for_the_whole_pipeline_covers_the_decode_and_a_second_optimize_replaces_the_first():
    pipe = _build("ltx")
    reference = _generate(pipe, "ltx")
    minimum = fxstream.optimize(pipe, "min")
    _generate(pipe, "ltx")
    [(_, baseline, floor)] = minimum.component("vae.decode").pipeline_peaks()
    budget = (floor + baseline) // 2  # resident weights + what the decode needs between its floor and eager's
    result = fxstream.optimize(pipe, budget_gb=budget / 2**30)
    assert pipe.vae.decode.compiled is result.component("vae.decode").module  # the first one's is gone
    np.testing.assert_allclose(_generate(pipe, "ltx"), reference, rtol=0, atol=ATOL)
    [(_, _, planned)] = result.component("vae.decode").pipeline_peaks()
    assert planned <= budget


def test_a_decode_switch_that_tiles_is_kept_and_named_in_a_warning():
    pipe = _build("hunyuanvideo")
    assert pipe.vae.use_framewise_decoding  # the class default: temporal tiles, blended
    with pytest.warns(UserWarning, match=r"vae \(AutoencoderKLHunyuanVideo\) has use_framewise_decoding on.*"
                                         r"vae.use_framewise_decoding = False"):
        fxstream.optimize(pipe, "min")
    pipe.vae.use_framewise_decoding = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxstream.optimize(pipe, "min")
