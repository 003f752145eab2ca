"""The model zoo: tiny builds run and capture exactly, full builds are the real architectures on meta."""

from __future__ import annotations

import functools

import pytest
import torch

from fxstream import models
from fxstream.capture import capture, normalize_inputs

TRANSFORMERS = ["wan2.1-1.3b", "wan2.1-14b", "hunyuanvideo", "ltx-video", "cogvideox-5b", "mochi"]
VIDEO_VAES = ["wan-vae-decoder", "hunyuanvideo-vae-decoder", "ltx-vae-decoder", "cogvideox-vae-decoder",
              "mochi-vae-decoder"]
ALL = ["svd", "svd-xt", "animatediff", "modelscope", *TRANSFORMERS, "svd-vae-decoder", "sd-vae-decoder", *VIDEO_VAES]

# Parameter counts of the full-size builds, computed once with diffusers 0.42.1 (see the config comments in
# fxstream/models.py). They match the published sizes: SVD UNet 1.52 B, AnimateDiff 1.31 B (SD-1.5 UNet
# 859.5 M + motion adapter v1-5-2 453.2 M), ModelScope UNet3D 1.41 B, SVD temporal decoder 63.6 M (of a
# 97.7 M VAE), SD-1.5 VAE decoder 49.5 M (of an 83.7 M VAE).
FULL_PARAMS = {
    "svd": 1_524_623_082,
    "svd-xt": 1_524_623_082,
    "animatediff": 1_312_730_244,
    "modelscope": 1_411_233_860,
    "svd-vae-decoder": 63_579_183,
    "sd-vae-decoder": 49_490_179,
    # the whole VAEs (encoder included): Wan 2.1 127 M, HunyuanVideo 246 M, LTX-Video 0.9.0 419 M,
    # CogVideoX 216 M, Mochi 460 M
    "wan-vae-decoder": 126_892_531,
    "hunyuanvideo-vae-decoder": 246_478_803,
    "ltx-vae-decoder": 419_193_649,
    "cogvideox-vae-decoder": 215_583_907,
    "mochi-vae-decoder": 459_748_611,
    # the published transformer sizes: Wan 2.1 1.3B and 14B, HunyuanVideo 13B, LTX-Video 2B, CogVideoX 5B, Mochi 10B
    "wan2.1-1.3b": 1_418_996_800,
    "wan2.1-14b": 14_288_491_584,
    "hunyuanvideo": 12_821_012_544,
    "ltx-video": 1_923_385_472,
    "cogvideox-5b": 5_570_283_072,
    "mochi": 10_027_677_744,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads that
    # spin-wait for a busy core make a 0.05 s forward take seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _tiny(name: str) -> models.BuiltModel:
    return models.build(name, "tiny")


@functools.cache
def _full(name: str) -> models.BuiltModel:
    """Full size on meta, built once per worker (a transformer takes 2-3 s)."""
    return models.build(name, "full")


def _tensor_output(out):
    """The sample tensor of a diffusers output (dataclass, tuple or plain tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"unexpected output type {type(out).__name__}")


def _tensors(m: models.BuiltModel) -> list[torch.Tensor]:
    return [v for v in [*m.args, *m.kwargs.values()] if isinstance(v, torch.Tensor)]


def test_names_and_zoo():
    assert models.names() == ALL
    assert models.ZOO["wan2.1-14b"].configs["tiny"] is models.ZOO["wan2.1-1.3b"].configs["tiny"]
    assert models.ZOO["wan2.1-14b"].configs["medium"] is models.ZOO["wan2.1-1.3b"].configs["medium"]
    assert set(models.ZOO) == set(ALL)
    for name, spec in models.ZOO.items():
        assert spec.name == name
        assert spec.family in ("unet", "transformer", "vae-decoder")
        assert set(spec.configs) == {"tiny", "medium", "full"}
        assert spec.description
    assert models.ZOO["svd"].default_frames == 14
    assert models.ZOO["svd-xt"].default_frames == 25
    assert (models.ZOO["svd"].default_height, models.ZOO["svd"].default_width) == (576, 1024)
    assert models.ZOO["animatediff"].default_frames == 16
    assert (models.ZOO["modelscope"].default_height, models.ZOO["modelscope"].default_width) == (256, 256)


# (B, T, C, h, w) for SVD, (B, C, T, h, w) for AnimateDiff / ModelScope, decoded frames for the VAE decoders.
TINY_OUT_SHAPES = {
    "svd": (2, 4, 4, 16, 16),
    "svd-xt": (2, 4, 4, 16, 16),
    "animatediff": (2, 4, 4, 16, 16),
    "modelscope": (2, 4, 4, 16, 16),
    "svd-vae-decoder": (4, 3, 128, 128),
    "sd-vae-decoder": (4, 3, 128, 128),
    "wan-vae-decoder": (1, 3, 9, 32, 32),
    "hunyuanvideo-vae-decoder": (1, 3, 9, 32, 32),
    "ltx-vae-decoder": (1, 3, 9, 32, 32),
    "cogvideox-vae-decoder": (1, 3, 9, 32, 32),
    "mochi-vae-decoder": (1, 3, 7, 32, 32),
    # the transformers' denoised latents, shaped as their inputs (LTX-Video: packed tokens)
    "wan2.1-1.3b": (1, 8, 3, 8, 8),
    "wan2.1-14b": (1, 8, 3, 8, 8),
    "hunyuanvideo": (1, 8, 3, 8, 8),
    "ltx-video": (2, 32, 8),
    "cogvideox-5b": (2, 3, 8, 8, 8),
    "mochi": (2, 4, 2, 8, 8),
}


# wan2.1-14b's tiny and medium configs are wan2.1-1.3b's: built and checked once
SMALL = [n for n in ALL if n != "wan2.1-14b"]


@pytest.mark.slow  # export: 1.5-3 s each, plus torch.export warm-up on the first
@pytest.mark.parametrize("name", SMALL)
def test_tiny_forward_and_capture_match_eager(name):
    m = _tiny(name)
    assert not m.module.training
    shape = models.ZOO[name].shapes.get("tiny", (4, 128, 128))
    assert (m.frames, m.height, m.width) == shape
    if name in VIDEO_VAES:
        assert TINY_OUT_SHAPES[name][2:] == shape
    with torch.no_grad():
        eager_out = m.module(*m.args, **m.kwargs)
    eager = _tensor_output(eager_out)
    assert eager.shape == TINY_OUT_SHAPES[name]
    assert torch.isfinite(eager).all()
    assert eager.std() > 1e-3  # random weights give a non-trivial output

    gm = capture(m.module, *m.args, **m.kwargs)
    args, kwargs = normalize_inputs(m.module, m.args, m.kwargs)
    with torch.no_grad():
        out = gm(*args, **kwargs)
    assert type(out) is type(eager_out)  # same output structure
    torch.testing.assert_close(_tensor_output(out), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_full_builds_on_meta_with_real_param_count(name):
    m = _full(name)
    assert m.size == "full"
    params = list(m.module.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert all(b.device.type == "meta" for b in m.module.buffers())
    assert all(t.device.type == "meta" for t in _tensors(m))
    n = sum(p.numel() for p in params)
    assert n == pytest.approx(FULL_PARAMS[name], rel=0.01)
    spec = models.ZOO[name]
    assert (m.frames, m.height, m.width) == (spec.default_frames, spec.default_height, spec.default_width)


def test_full_example_inputs_follow_the_pipelines():
    svd = _full("svd")
    sample, t = svd.args
    assert sample.shape == (2, 14, 8, 72, 128)
    assert t.dim() == 0
    assert svd.kwargs["encoder_hidden_states"].shape == (2, 1, 1024)
    assert svd.kwargs["added_time_ids"].shape == (2, 3)
    assert "return_dict" not in svd.kwargs

    xt = _full("svd-xt")
    assert xt.args[0].shape == (2, 25, 8, 72, 128)

    ad = _full("animatediff")
    assert ad.args[0].shape == (2, 4, 16, 64, 64)
    assert ad.args[1].dim() == 0
    # AnimateDiffPipeline repeats the prompt embeddings per frame before calling the UNet.
    assert ad.kwargs["encoder_hidden_states"].shape == (2 * 16, 77, 768)

    ms = _full("modelscope")
    assert ms.args[0].shape == (2, 4, 16, 32, 32)
    assert ms.kwargs["encoder_hidden_states"].shape == (2, 77, 1024)

    vae = _full("svd-vae-decoder")
    assert vae.args[0].shape == (14, 4, 72, 128)
    assert vae.kwargs["num_frames"] == 14
    assert vae.kwargs["image_only_indicator"].shape == (1, 14)
    assert vae.cfg is False

    sd = _full("sd-vae-decoder")
    assert sd.args[0].shape == (16, 4, 64, 64)

    # the DiT-era pipelines' latents: 1 + (F - 1) / t latent frames (t = 4, LTX 8, Mochi 6), pixels / 8 (LTX 32)
    latents = {"wan-vae-decoder": (1, 16, 21, 60, 104), "hunyuanvideo-vae-decoder": (1, 16, 33, 90, 160),
               "ltx-vae-decoder": (1, 128, 16, 16, 24), "cogvideox-vae-decoder": (1, 16, 13, 60, 90),
               "mochi-vae-decoder": (1, 12, 28, 60, 106)}
    for name, shape in latents.items():
        m = _full(name)
        assert m.args[0].shape == shape and not m.kwargs
        vae = m.module.vae
        assert not any(getattr(vae, flag, False) for flag in models.VAE_SWITCHES)  # one whole decode


def test_full_transformer_inputs_follow_the_pipelines():
    # latents 1 + (F - 1) / t frames (t = 4, LTX 8, Mochi 6) of pixels / 8 (LTX 32); prompts at the pipelines'
    # max_sequence_length; the guidance batch where the pipeline batches it (LTX-Video, CogVideoX, Mochi)
    expect = {
        "wan2.1-1.3b": ((1, 16, 21, 60, 104), (1, 512, 4096)),
        "wan2.1-14b": ((1, 16, 21, 90, 160), (1, 512, 4096)),
        "hunyuanvideo": ((1, 16, 33, 90, 160), (1, 256, 4096)),
        "ltx-video": ((2, 21 * 16 * 22, 128), (2, 128, 4096)),
        "cogvideox-5b": ((2, 13, 16, 60, 90), (2, 226, 4096)),
        "mochi": ((2, 12, 4, 60, 106), (2, 256, 4096)),
    }
    for name, (latents, prompt) in expect.items():
        m = _full(name)
        assert m.kwargs["hidden_states"].shape == latents, name
        assert m.kwargs["encoder_hidden_states"].shape == prompt, name
        assert m.kwargs["timestep"].shape == (latents[0],)
    cos, sin = _full("cogvideox-5b").kwargs["image_rotary_emb"]
    assert cos.shape == sin.shape == (13 * 30 * 45, 64)  # one row per patch, the head dim
    ltx = _full("ltx-video").kwargs
    assert (ltx["num_frames"], ltx["height"], ltx["width"]) == (21, 16, 22)
    with pytest.raises(ValueError, match="frames - 1 must be divisible by 8"):
        models.build("ltx-video", "tiny", frames=12)


@pytest.mark.parametrize("name", [n for n in TRANSFORMERS if n != "mochi"])
def test_full_transformers_run_on_meta(name):
    # Mochi's rotary embedding enters torch.autocast(device_type=<the input's device>), which refuses "meta"
    m = _full(name)
    with torch.no_grad():
        out = _tensor_output(m())
    assert out.device.type == "meta"
    assert out.shape == m.kwargs["hidden_states"].shape


def test_full_meta_forward_shapes():
    m = models.build("svd", "full", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in m.module.parameters())
    with torch.no_grad():
        out = _tensor_output(m())
    assert out.device.type == "meta"
    assert out.shape == (2, 14, 4, 72, 128)
    assert out.dtype == torch.float16


def test_cfg_batch_and_size_overrides():
    m = models.build("svd", "tiny", cfg=False, batch=3, frames=6, height=64, width=96)
    assert m.cfg is False
    assert m.args[0].shape == (3, 6, 8, 8, 12)
    assert m.kwargs["added_time_ids"].shape == (3, 3)
    with torch.no_grad():
        assert _tensor_output(m()).shape == (3, 6, 4, 8, 12)

    m = models.build("animatediff", "tiny", batch=2, frames=3)
    assert m.args[0].shape == (4, 4, 3, 16, 16)
    assert m.kwargs["encoder_hidden_states"].shape[0] == 4 * 3

    m = models.build("sd-vae-decoder", "tiny", batch=2, frames=3)
    assert m.args[0].shape == (6, 4, 16, 16)
    assert m.cfg is False


@pytest.mark.parametrize("name", SMALL)
def test_medium_builds(name):
    m = models.build(name, "medium")
    assert (m.frames, m.height, m.width) == models.ZOO[name].default_shape("medium")
    if name not in VIDEO_VAES + TRANSFORMERS:
        assert (m.frames, m.height, m.width) == (8, 256, 256)
    assert 1e5 < m.num_parameters < 5e7
    assert all(p.device.type == "cpu" for p in m.module.parameters())


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        (dict(name="nope"), "name"),
        (dict(name="svd", size="huge"), "size"),
        (dict(name="svd", frames=0), "frames"),
        (dict(name="svd", frames=-2), "frames"),
        (dict(name="svd", height=0), "height"),
        (dict(name="svd", width=-8), "width"),
        (dict(name="svd", height=100), "height"),
        (dict(name="svd", width=129), "width"),
        (dict(name="svd", batch=0), "batch"),
        (dict(name="svd", frames=2.5), "frames"),
        (dict(name="animatediff", frames=33), "frames"),
        (dict(name="svd", dtype=torch.int64), "dtype"),
        (dict(name="svd", device="no-such-device"), "device"),
        (dict(name="wan-vae-decoder", frames=8), "frames"),  # 1 + 4k frames
        (dict(name="ltx-vae-decoder", size="full", height=520), "height"),  # LTX: multiples of 32
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, arg):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        models.build(name, **kwargs)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        models.build("nope")
    for name in ALL:
        assert name in str(info.value)


def test_seeded_tiny_builds_are_reproducible():
    rng_before = torch.get_rng_state()
    a = models.build("animatediff", "tiny", seed=3)
    b = models.build("animatediff", "tiny", seed=3)
    c = models.build("animatediff", "tiny", seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    sa, sb, sc = a.module.state_dict(), b.module.state_dict(), c.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    for x, y in zip(_tensors(a), _tensors(b)):
        assert torch.equal(x, y)
    assert not torch.equal(a.args[0], c.args[0])
    with torch.no_grad():
        torch.testing.assert_close(_tensor_output(a()), _tensor_output(b()), rtol=0, atol=0)


def test_no_zero_initialised_layers_in_tiny_builds():
    # UNet3D's temporal convs end in a zero-initialised conv; the zoo re-randomises it so that it counts.
    m = _tiny("modelscope")
    for name, p in m.module.named_parameters():
        if p.dim() >= 2:
            assert p.any(), name


def test_modules_do_not_record_autograd():
    m = _tiny("sd-vae-decoder")
    assert not any(p.requires_grad for p in m.module.parameters())
    assert not _tensor_output(m.module(*m.args, **m.kwargs)).requires_grad
