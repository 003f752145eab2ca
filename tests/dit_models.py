"""Tiny random-weight diffusers 0.42 video DiTs and video-VAE decoders, called as their pipelines call them.

For "never crash" tests: every model here runs eagerly in well under a second on one CPU core and is captured by
``torch.export`` (non-strict). Nothing is downloaded; weights are random, seeded.

    from dit_models import NAMES, build        # tests/ on the path, as pytest puts it
    b = build("wan-transformer")
    out = b.module(*b.args, **b.kwargs)

Transformers are called with the keyword arguments their pipelines pass (``return_dict`` omitted: the model's
default, a ``Transformer2DModelOutput``). VAE entries are :class:`fxstream.models.VaeDecode`, whose ``forward(z)``
returns ``vae.decode(z).sample`` with tiling / framewise decoding / batch slicing turned off, so the whole latent is
decoded by one call: the five DiT-era VAEs are the model zoo's tiny entries (``ZOO_VAES``, configs and notes in
``fxstream/models.py``); Allegro's, which cannot decode untiled, is only here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fxstream.dit_pipelines import (COGVIDEOX_TRANSFORMER_TINY, HUNYUAN_TRANSFORMER_TINY, LTX_TRANSFORMER_TINY,
                                    MOCHI_TRANSFORMER_TINY, WAN_TRANSFORMER_TINY)
from fxstream.models import VaeDecode

__all__ = ["NAMES", "ZOO_VAES", "Built", "build"]


@dataclass
class Built:
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _rerandomize_zero_params(module: nn.Module, gen: torch.Generator) -> None:
    """Give every all-zero weight small random values, so that every layer affects the output.

    diffusers zero-initialises some layers (and ``ModelMixin`` construction leaves some parameters at zero, e.g.
    gates / scale tables); a zero weight would make a whole branch a no-op. Biases are left as they are.
    """
    for name, p in module.named_parameters():
        if name.endswith("bias") or p.numel() == 0 or p.device.type == "meta":
            continue
        if not p.detach().any():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)


def _finish(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed + 1)
    _rerandomize_zero_params(module, gen)
    module.to(torch.float32)
    module.eval()
    module.requires_grad_(False)
    return module


def _quiet_diffusers():
    """Silence diffusers' construction-time warnings (config attributes, deprecations)."""
    from diffusers.utils import logging as dlogging

    old = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    return lambda: dlogging.set_verbosity(old)


# ----------------------------------------------------------------------------------------------------------------
# transformers (denoisers): their configs are fxstream.dit_pipelines' tiny ones, shared with the tiny pipelines


def _wan_transformer(gen: torch.Generator):
    """Wan 2.1 T2V (``WanPipeline``): latents (B, 16, 1 + (F-1)/4, H/8, W/8), UMT5 text embeds (B, 512, 4096)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**WAN_TRANSFORMER_TINY)
    latents = _randn(gen, 1, 8, 3, 8, 8)  # 3 latent frames (9 video frames), 8x8 latent -> 48 tokens
    kwargs = dict(
        hidden_states=latents,
        timestep=torch.tensor([500.0]),  # t.expand(batch): a 1-element float tensor (flow-matching timesteps)
        encoder_hidden_states=_randn(gen, 1, 4, 16),
    )
    return model, (), kwargs


def _ltx_transformer(gen: torch.Generator):
    """LTX-Video (``LTXPipeline``): packed latents (B, F*H*W, 128), T5 embeds (B, L, 4096) + bool mask."""
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(**LTX_TRANSFORMER_TINY)
    f, h, w = 3, 4, 4
    latents = _randn(gen, 1, 8, f, h, w)
    # LTXPipeline._pack_latents (patch 1): [B, C, F, H, W] -> [B, F*H*W, C]
    packed = latents.permute(0, 2, 3, 4, 1).flatten(1, 3)
    mask = torch.tensor([[True, True, True, False]])  # the tokenizer's padding mask, .bool()
    kwargs = dict(
        hidden_states=packed,
        encoder_hidden_states=_randn(gen, 1, 4, 16),
        timestep=torch.tensor([500.0]),
        encoder_attention_mask=mask,
        num_frames=f,
        height=h,
        width=w,
        # (vae_temporal_compression_ratio / frame_rate, vae_spatial_compression_ratio, vae_spatial_compression_ratio)
        rope_interpolation_scale=(8 / 25, 32, 32),
    )
    return model, (), kwargs


def _cogvideox_transformer(gen: torch.Generator):
    """CogVideoX-2b (``CogVideoXPipeline``): latents (B, F, 16, H/8, W/8), T5 embeds (B, 226, 4096).

    The 2b config: sincos positional embeddings, no rotary embedding (``image_rotary_emb`` is None, as the
    pipeline passes it when ``use_rotary_positional_embeddings`` is False).
    """
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(**COGVIDEOX_TRANSFORMER_TINY)
    kwargs = dict(
        hidden_states=_randn(gen, 1, 3, 8, 8, 8),  # (B, F, C, H, W): 3 x 4 x 4 = 48 patches
        encoder_hidden_states=_randn(gen, 1, 4, 16),
        timestep=torch.tensor([500]),  # DDIM timesteps: int64, t.expand(batch)
        image_rotary_emb=None,
    )
    return model, (), kwargs


def _hunyuan_transformer(gen: torch.Generator):
    """HunyuanVideo (``HunyuanVideoPipeline``): latents (B, 16, F, H, W), Llama embeds + float mask, CLIP pooled."""
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(**HUNYUAN_TRANSFORMER_TINY)
    kwargs = dict(
        hidden_states=_randn(gen, 1, 8, 3, 8, 8),  # 3 x 4 x 4 = 48 tokens
        timestep=torch.tensor([500.0]),  # t.expand(batch).to(latents.dtype)
        encoder_hidden_states=_randn(gen, 1, 4, 16),
        encoder_attention_mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]]),  # .to(transformer_dtype)
        pooled_projections=_randn(gen, 1, 8),
        guidance=torch.tensor([6.0 * 1000.0]),  # guidance_scale * 1000
    )
    return model, (), kwargs


def _mochi_transformer(gen: torch.Generator):
    """Mochi 1 (``MochiPipeline``): latents (B, 12, F, H, W), T5 embeds (B, 256, 4096) + bool mask.

    Its attention keeps only the prompt's valid tokens (``torch.nonzero`` on the mask), so some sizes depend on
    the data: the planner leaves those nodes whole and counts them at their largest.
    """
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(**MOCHI_TRANSFORMER_TINY)
    kwargs = dict(
        hidden_states=_randn(gen, 1, 4, 3, 8, 8),  # 3 x 4 x 4 = 48 tokens
        encoder_hidden_states=_randn(gen, 1, 4, 16),
        timestep=torch.tensor([500.0]),  # t.expand(batch).to(latents.dtype)
        encoder_attention_mask=torch.tensor([[True, True, True, False]]),
    )
    return model, (), kwargs


# ----------------------------------------------------------------------------------------------------------------
# VAE decoders


def _allegro_vae(gen: torch.Generator):
    """Allegro VAE: z (B, 4, F/4, H/8, W/8).

    ``AutoencoderKLAllegro._decode`` cannot run un-tiled at all: with ``use_tiling=False`` it raises
    ``NotImplementedError("Decoding without tiling has not been implemented yet.")``. So tiling stays ON, and the
    config makes one tile cover exactly the whole latent: the tile is (24 frames, sample_size, sample_size) in pixel
    space (24 hard-coded), i.e. (24 / temporal_compression_ratio, sample_size / 2**(blocks-1), ...) in latent space,
    so with 3 temporal-upsampling blocks (8x) and sample_size 16 (4x spatial) a (3, 4, 4) latent is one tile; the
    tile blend is then a no-op (a single tile blends no edge). Note the tiled path returns (B, F, C, H, W).
    """
    from diffusers import AutoencoderKLAllegro

    vae = AutoencoderKLAllegro(
        down_block_types=("AllegroDownBlock3D",) * 3,
        up_block_types=("AllegroUpBlock3D",) * 3,
        block_out_channels=(8, 16, 16),
        temporal_downsample_blocks=(True, True, True),
        temporal_upsample_blocks=(True, True, True),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=8,
        sample_size=16,
    )
    vae.use_slicing = False
    vae.use_tiling = True  # the only decode path the class has (see above): one tile == the whole latent
    return vae, _randn(gen, 1, 4, 3, 4, 4)  # -> (1, 24, 3, 16, 16)


# ----------------------------------------------------------------------------------------------------------------
# registry

_TRANSFORMERS: dict[str, Callable] = {
    "wan-transformer": _wan_transformer,
    "ltx-transformer": _ltx_transformer,
    "cogvideox-transformer": _cogvideox_transformer,
    "hunyuan-transformer": _hunyuan_transformer,
    "mochi-transformer": _mochi_transformer,
}
# The five DiT-era VAE decodes are the model zoo's tiny entries (fxstream.models); Allegro's is only here.
ZOO_VAES = ["wan-vae-decoder", "hunyuanvideo-vae-decoder", "mochi-vae-decoder", "ltx-vae-decoder",
            "cogvideox-vae-decoder"]
_VAES: dict[str, Callable] = {
    "allegro-vae-decode": _allegro_vae,
}

NAMES: list[str] = [*_TRANSFORMERS, *ZOO_VAES, *_VAES]


def build(name: str, seed: int = 0) -> Built:
    """A tiny random-weight model (eval, fp32, no grad) and the example inputs its pipeline would pass."""
    if name not in NAMES:
        raise KeyError(f"unknown model {name!r}; expected one of {NAMES}")
    if name in ZOO_VAES:
        from fxstream import models

        built = models.build(name, "tiny", seed=seed)
        return Built(name=name, module=built.module, args=built.args, kwargs=built.kwargs)
    restore = _quiet_diffusers()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        if name in _TRANSFORMERS:
            model, args, kwargs = _TRANSFORMERS[name](gen)
            module = _finish(model, seed)
        else:
            vae, z = _VAES[name](gen)
            module = _finish(VaeDecode(vae), seed)
            args, kwargs = (z,), {}
    finally:
        restore()
    return Built(name=name, module=module, args=args, kwargs=kwargs)
