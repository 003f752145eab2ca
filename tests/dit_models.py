"""Tiny random-weight diffusers 0.42 video DiTs and video-VAE decoders, called as their pipelines call them.

For "never crash" tests: every model here runs eagerly in well under a second on one CPU core and is captured by
``torch.export`` (non-strict). Nothing is downloaded; weights are random, seeded.

    from dit_models import NAMES, build        # tests/ on the path, as pytest puts it
    b = build("wan-transformer")
    out = b.module(*b.args, **b.kwargs)

Transformers are called with the keyword arguments their pipelines pass (``return_dict`` omitted: the model's
default, a ``Transformer2DModelOutput``). VAE entries wrap the VAE (kept as the registered submodule ``.vae``) in
:class:`VaeDecode`, whose ``forward(z)`` returns ``vae.decode(z).sample`` with tiling / framewise decoding / batch
slicing turned off, so the whole latent is decoded by one call (see the per-class notes in ``_VAE_NOTES``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["NAMES", "Built", "VaeDecode", "build"]


@dataclass
class Built:
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict


class VaeDecode(nn.Module):
    """``forward(z) = vae.decode(z).sample``: the VAE's own decode path, the VAE a registered submodule."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


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
# transformers (denoisers)


def _wan_transformer(gen: torch.Generator):
    """Wan 2.1 T2V (``WanPipeline``): latents (B, 16, 1 + (F-1)/4, H/8, W/8), UMT5 text embeds (B, 512, 4096)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # rope splits head_dim into t/h/w parts (4/4/4)
        in_channels=8,
        out_channels=8,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
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

    model = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=12,  # inner dim 24: rope uses inner_dim // 6 frequencies per axis
        cross_attention_dim=24,
        num_layers=2,
        caption_channels=16,
    )
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

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=8,
        out_channels=8,
        time_embed_dim=16,
        text_embed_dim=16,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,  # (9 - 1) // 4 + 1 = 3 latent frames
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=4,
    )
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

    model = HunyuanVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),  # sums to attention_head_dim
    )
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

    model = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        qk_norm="rms_norm",
        text_embed_dim=16,
        time_embed_dim=4,
        max_sequence_length=4,
    )
    kwargs = dict(
        hidden_states=_randn(gen, 1, 4, 3, 8, 8),  # 3 x 4 x 4 = 48 tokens
        encoder_hidden_states=_randn(gen, 1, 4, 16),
        timestep=torch.tensor([500.0]),  # t.expand(batch).to(latents.dtype)
        encoder_attention_mask=torch.tensor([[True, True, True, False]]),
    )
    return model, (), kwargs


# ----------------------------------------------------------------------------------------------------------------
# VAE decoders


def _vae_off(vae: nn.Module) -> nn.Module:
    """Turn off every tiling / framewise / batch-slicing switch the class has: one decode of the whole latent."""
    for flag in ("use_tiling", "use_slicing", "use_framewise_decoding", "use_framewise_encoding"):
        if hasattr(vae, flag):
            setattr(vae, flag, False)
    return vae


def _wan_vae(gen: torch.Generator):
    """Wan 2.1 VAE: z (B, 16, 1 + (F-1)/4, H/8, W/8).

    ``AutoencoderKLWan._decode`` has no whole-latent path: it always runs the decoder one latent frame at a time
    with a causal feature cache (``self._feat_map``), by design of the model; with tiling off this is its plain
    decode, which export unrolls over the latent frames.
    """
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=8,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 8,
        latents_std=[1.0] * 8,
    )
    return _vae_off(vae), _randn(gen, 1, 8, 3, 4, 4)  # -> (1, 3, 9, 32, 32)


def _hunyuan_vae(gen: torch.Generator):
    """HunyuanVideo VAE: z (B, 16, 1 + (F-1)/4, H/8, W/8). Tiny: 3 up blocks, 4x spatial, 4x temporal."""
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo(
        latent_channels=8,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,  # the decoder supports 4 only
        mid_block_add_attention=True,
    )
    return _vae_off(vae), _randn(gen, 1, 8, 3, 8, 8)  # -> (1, 3, 9, 32, 32)


def _mochi_vae(gen: torch.Generator):
    """Mochi VAE: z (B, 12, (F-1)/6 + 1, H/8, W/8). Channels must be multiples of 32 (GroupNorm(32) hard-coded)."""
    from diffusers import AutoencoderKLMochi

    vae = AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        latent_channels=8,
        layers_per_block=(1, 1, 1, 1, 1),
        temporal_expansions=(1, 2, 3),
        spatial_expansions=(2, 2, 2),
        add_attention_block=(False, False, False, False, False),
        latents_mean=(0.0,) * 8,
        latents_std=(1.0,) * 8,
    )
    # drop_last_temporal_frames stays True (the default): 2 * 6 - 5 = 7 frames
    return _vae_off(vae), _randn(gen, 1, 8, 2, 4, 4)  # -> (1, 3, 7, 32, 32)


def _ltx_vae(gen: torch.Generator):
    """LTX-Video 0.9.0 VAE (no timestep conditioning): z (B, 128, (F-1)/8 + 1, H/32, W/32). Tiny: 8x, 4x.

    The last block has 32 channels for the 3 x 2 x 2 = 12 its output convolution makes before the patches are
    unfolded (the real decoder: 128 for 3 x 4 x 4 = 48, the same ratio), so the output does not outweigh the
    decoder as it would with 8 channels for 48."""
    from diffusers import AutoencoderKLLTXVideo

    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 16, 16),
        down_block_types=("LTXVideoDownBlock3D",) * 3,
        decoder_block_out_channels=(32, 32, 32),
        layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False),
        decoder_spatio_temporal_scaling=(True, True, False),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("conv", "conv", "conv"),
        upsample_residual=(False, False, False),
        upsample_factor=(1, 1, 1),
        timestep_conditioning=False,
        patch_size=2,
        patch_size_t=1,
    )
    return _vae_off(vae), _randn(gen, 1, 8, 3, 4, 4)  # -> (1, 3, 9, 32, 32)


def _cogvideox_vae(gen: torch.Generator):
    """CogVideoX VAE: z (B, 16, (F-1)/4 + 1, H/8, W/8). Tiny: 3 up blocks, 4x spatial, 4x temporal.

    ``_decode`` always decodes in batches of ``num_latent_frames_batch_size`` (2) latent frames with a conv cache;
    with 3 latent frames (odd: the first batch takes the remainder) that is one batch, the whole latent at once.
    """
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=8,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=32,
        sample_width=32,
    )
    return _vae_off(vae), _randn(gen, 1, 8, 3, 8, 8)  # -> (1, 3, 9, 32, 32)


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
_VAES: dict[str, Callable] = {
    "wan-vae-decode": _wan_vae,
    "hunyuan-vae-decode": _hunyuan_vae,
    "mochi-vae-decode": _mochi_vae,
    "ltx-vae-decode": _ltx_vae,
    "cogvideox-vae-decode": _cogvideox_vae,
    "allegro-vae-decode": _allegro_vae,
}

NAMES: list[str] = [*_TRANSFORMERS, *_VAES]


def build(name: str, seed: int = 0) -> Built:
    """A tiny random-weight model (eval, fp32, no grad) and the example inputs its pipeline would pass."""
    if name not in _TRANSFORMERS and name not in _VAES:
        raise KeyError(f"unknown model {name!r}; expected one of {NAMES}")
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
