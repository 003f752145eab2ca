"""The model zoo: the diffusers video models fxstream targets, at three sizes, with pipeline-exact inputs.

    m = fxstream.models.build("svd", "tiny")
    out = m.module(*m.args, **m.kwargs)          # one UNet forward, as the pipeline calls it

Sizes:

* ``"full"``: the real architecture and config (from the model cards' ``config.json``), built on the ``meta``
  device by default: no memory, a few seconds, meta example inputs. Use it for capture and memory estimates
  of the real model (``../shared/reference/CAPTURE-NOTES.md``, "Full-size facts"). Passing an explicit
  ``device`` materialises random weights there instead (6 GB fp32 for SVD: meant for a GPU).
* ``"medium"``: the same block types with CPU-friendly widths, real random weights; used for memory
  measurements (each forward is at most a few seconds on a 2-core CPU).
* ``"tiny"``: the smallest config of the same architecture (2 levels, 32/64 channels, 1 layer per block);
  a forward takes well under a second and a capture a few seconds. Used by the tests.

Pixel sizes are video sizes before the VAE factor 8: latents are ``height // 8`` x ``width // 8``.

Sizes chosen (default frames x pixels; widths per level; layers per block):

=============== ======================= ======================= ====================================
model           tiny (4 x 128x128)      medium (8 x 256x256)    full (pipeline default)
=============== ======================= ======================= ====================================
svd, svd-xt     32/64, 1, heads 2/4     64/128/128, 2, heads    320/640/1280/1280, 2; 14 (xt: 25)
                                        2/4/4                   x 576x1024
animatediff     32/64, 1, 2 heads,      64/128/128, 2, 4 heads  SD-1.5 + adapter v1-5-2; 16 x 512x512
                motion 2 heads          motion 4 heads
modelscope      32/64, 1, head dim 16   64/128/128, 2, head     320/640/1280/1280, 2; 16 x 256x256
                                        dim 32
svd-vae-dec.    32/32/32/32, 1          32/32/64/64, 1          128/256/512/512, 2; 14 x 576x1024
sd-vae-dec.     16/16/32/32, 1          32/32/64/64, 1          128/256/512/512, 2; 16 x 512x512
wan-vae-dec.    8/16/16/16, 9 x 32x32   32/64/128/128, 9 x      Wan 2.1 VAE; 81 x 480x832
                                        128x128
hunyuanvideo-   8/16/16 (4x), 9 x 32x32 32/32/64/64, 9 x        128/256/512/512; 129 x 720x1280
vae-dec.                                128x128
ltx-vae-dec.    32/32/32 (patch 2),     32/64/64/64, 17 x       LTX-Video 0.9.0; 121 x 512x768
                9 x 32x32               256x256
cogvideox-vae-  8/16/16 (4x), 9 x 32x32 32/32/64/64, 9 x        128/256/256/512; 49 x 480x720
dec.                                    128x128
mochi-vae-dec.  32/32/32/32, 7 x 32x32  32/32/64/64, 13 x       128/256/512/768; 163 x 480x848
                                        128x128
wan2.1-1.3b,    2 heads of 12, 2        4 heads of 32, 2        12 / 40 heads of 128, 30 / 40
wan2.1-14b      blocks; 9 x 64x64       blocks; 17 x 256x256    blocks; 81 x 480x832 / 720x1280
hunyuanvideo    2 heads of 8, 1 + 1     4 heads of 32, 1 + 1    24 heads of 128, 20 + 40 blocks;
                blocks; 9 x 64x64       blocks; 17 x 256x256    129 x 720x1280
ltx-video       2 heads of 12, 2        4 heads of 36, 2        32 heads of 64, 28 blocks; 161 x
                blocks; 9 x 128x128     blocks; 17 x 512x512    512x704
cogvideox-5b    2 heads of 8, 2 blocks  4 heads of 32, 2        48 heads of 64, 42 blocks; 49 x
                (sincos); 9 x 64x64     blocks; 17 x 256x256    480x720
mochi           2 heads of 8, 2         4 heads of 32, 2        24 heads of 128, 48 blocks; 19 x
                blocks; 7 x 64x64       blocks; 13 x 256x256    480x848
=============== ======================= ======================= ====================================

The video transformers are called as their pipelines call them (keyword arguments, the prompt at the
pipeline's ``max_sequence_length`` at full size and 16 tokens below it, the guidance batch where the pipeline
batches it); their frame and pixel rules are their VAEs' (latents 1 + (F - 1) / 4 frames of pixels / 8; LTX-Video
1 + (F - 1) / 8 of pixels / 32, Mochi 1 + (F - 1) / 6). At full size, the eager forward of Mochi on meta fails in
diffusers (``torch.autocast`` on the inputs' device type); :func:`fxstream.plan` captures it as on the CPU.

The DiT-era VAE entries are the VAE's whole ``decode`` (:class:`VaeDecode`), with their own frame and size rules
(frames 1 + 4k, LTX-Video 1 + 8k, Mochi 1 + 6k; pixels divisible by the VAE's factor); see the comment above
``WAN_VAE_FULL``.

Tiny and medium UNets keep the full model's block pattern (cross-attention levels, then one plain level) with
fewer levels; cross-attention dims are 32 (tiny) and 64 (medium); VAE decoders keep all 4 levels so that the
factor 8 holds. SVD's classes hard-code GroupNorm(32), so their widths are multiples of 32.

Every module is returned in eval mode with ``requires_grad=False`` on its parameters, so a plain call does
not record an autograd graph (the pipelines run under ``torch.no_grad()``; memory measured on the zoo must
not include saved activations). Tiny and medium weights are random, seeded by ``seed``; layers that diffusers
initialises to zero (UNet3D's last temporal convolution) are re-randomised, so every layer affects the output
and a transformation that breaks one cannot go unnoticed.

Example inputs follow the diffusers pipelines' UNet / VAE-decoder calls, with ``None``-valued keywords and
``return_dict`` omitted (left to the default). The timestep is a 0-d tensor: a python number would be
specialised into a guard by ``torch.export``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

SIZES = ("tiny", "medium", "full")
VAE_SCALE_FACTOR = 8  # every VAE here: 3 upsamplers (4 levels)

# Per-size default (frames, height, width) for tiny and medium; "full" uses ModelSpec.default_*.
_TINY_SHAPE = (4, 128, 128)  # latents 16x16
_MEDIUM_SHAPE = (8, 256, 256)  # latents 32x32


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


# ------------------------------------------------------------------------------------------------------------
# Stable Video Diffusion (img2vid / img2vid-xt): UNetSpatioTemporalConditionModel.
# Full: stabilityai/stable-video-diffusion-img2vid(-xt) unet/config.json == the diffusers class defaults,
# except num_frames (14 / 25; a config value only, it does not change the architecture). 1,524,623,082
# parameters.
# Note: the class hard-codes GroupNorm(32 groups), so every width must be a multiple of 32.
SVD_UNET_CONFIG = _frozen(
    dict(
        sample_size=96,
        in_channels=8,  # 4 noisy latents + 4 conditioning-image latents
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ),
        up_block_types=(
            "UpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
        ),
        block_out_channels=(320, 640, 1280, 1280),
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=768,  # 3 added time ids x 256
        layers_per_block=2,
        cross_attention_dim=1024,  # CLIP ViT-H image embedding
        transformer_layers_per_block=1,
        num_attention_heads=(5, 10, 20, 20),  # head dim 64
        num_frames=14,
    )
)
SVD_XT_UNET_CONFIG = _frozen({**SVD_UNET_CONFIG, "num_frames": 25})

# Tiny: 2 levels (cross-attention level + plain level, like the full model's first and last), head dim 16.
SVD_UNET_TINY = _frozen(
    dict(
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=48,
        layers_per_block=1,
        cross_attention_dim=32,
        transformer_layers_per_block=1,
        num_attention_heads=(2, 4),
        num_frames=4,
    )
)
# Medium: 3 levels (two cross-attention levels + plain level), 2 layers per block like the full model,
# head dim 32.
SVD_UNET_MEDIUM = _frozen(
    dict(
        in_channels=8,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ),
        up_block_types=(
            "UpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
        ),
        block_out_channels=(64, 128, 128),
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=96,
        layers_per_block=2,
        cross_attention_dim=64,
        transformer_layers_per_block=1,
        num_attention_heads=(2, 4, 4),
        num_frames=8,
    )
)

# SVD pipeline constants (StableVideoDiffusionPipeline.__call__ defaults): added_time_ids = [fps - 1,
# motion_bucket_id, noise_aug_strength] with fps=7; first Euler timestep 0.25 * log(sigma_max=700).
SVD_ADDED_TIME_IDS = (6.0, 127.0, 0.02)
SVD_FIRST_TIMESTEP = 0.25 * math.log(700.0)

# ------------------------------------------------------------------------------------------------------------
# AnimateDiff: UNetMotionModel.from_unet2d(SD-1.5 UNet2DConditionModel, MotionAdapter).
# SD-1.5 UNet: runwayml/stable-diffusion-v1-5 unet/config.json ("attention_head_dim": 8 is really the number
# of heads, a historical misnomer). 859,520,964 parameters.
SD15_UNET_CONFIG = _frozen(
    dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=768,  # CLIP ViT-L text encoder
        attention_head_dim=8,
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
    )
)
# guoyww/animatediff-motion-adapter-v1-5-2 config.json. 453,209,280 parameters. The combined UNetMotionModel
# has 1,312,730,244 (the adapter's motion modules plus the SD-1.5 UNet).
MOTION_ADAPTER_V152_CONFIG = _frozen(
    dict(
        block_out_channels=(320, 640, 1280, 1280),
        motion_layers_per_block=2,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=8,
        motion_norm_num_groups=32,
        motion_max_seq_length=32,  # sinusoidal position table: at most 32 frames
        use_motion_mid_block=True,
        conv_in_channels=None,
    )
)
ANIMATEDIFF_FULL = _frozen(dict(unet=SD15_UNET_CONFIG, motion_adapter=MOTION_ADAPTER_V152_CONFIG))
ANIMATEDIFF_TINY = _frozen(
    dict(
        unet=_frozen(
            dict(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=1,
                norm_num_groups=8,
                cross_attention_dim=32,
                attention_head_dim=2,  # 2 heads
            )
        ),
        motion_adapter=_frozen(
            dict(
                block_out_channels=(32, 64),
                motion_layers_per_block=1,
                motion_num_attention_heads=2,
                motion_norm_num_groups=8,
                motion_max_seq_length=32,
                use_motion_mid_block=True,
            )
        ),
    )
)
ANIMATEDIFF_MEDIUM = _frozen(
    dict(
        unet=_frozen(
            dict(
                sample_size=32,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(64, 128, 128),
                layers_per_block=2,
                norm_num_groups=32,
                cross_attention_dim=64,
                attention_head_dim=4,  # 4 heads
            )
        ),
        motion_adapter=_frozen(
            dict(
                block_out_channels=(64, 128, 128),
                motion_layers_per_block=2,
                motion_num_attention_heads=4,
                motion_norm_num_groups=32,
                motion_max_seq_length=32,
                use_motion_mid_block=True,
            )
        ),
    )
)

# ------------------------------------------------------------------------------------------------------------
# ModelScope text-to-video / Zeroscope v2: UNet3DConditionModel. damo-vilab/text-to-video-ms-1.7b and
# cerspense/zeroscope_v2_576w share this unet/config.json (== the diffusers class defaults). 1,411,233,860
# parameters. "attention_head_dim" goes through two misnomers that cancel: UNet3DConditionModel takes it as
# the number of heads, and its blocks pass (channels // that, that) to Transformer2DModel(num_heads,
# head_dim), so it is the head dim after all: 64 (5/10/20/20 heads). transformer_in has 8 heads of that dim
# (inner dim 512).
MODELSCOPE_UNET_CONFIG = _frozen(
    dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "DownBlock3D",
        ),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=1024,  # OpenCLIP ViT-H text encoder
        attention_head_dim=64,
    )
)
MODELSCOPE_UNET_TINY = _frozen(
    dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=16,  # really the head dim here (2 and 4 heads), see MODELSCOPE_UNET_CONFIG
    )
)
MODELSCOPE_UNET_MEDIUM = _frozen(
    dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=64,
        attention_head_dim=32,  # really the head dim here (2, 4, 4 heads), see MODELSCOPE_UNET_CONFIG
    )
)

# ------------------------------------------------------------------------------------------------------------
# VAE decoders. The module is the diffusers decoder submodule itself (``pipe.vae.decoder``), called as the
# VAE's ``decode`` calls it, with all frames at once (the pipelines' default: SVD decode_chunk_size =
# num_frames, AnimateDiff decode_chunk_size = 16). The 1x1 ``post_quant_conv`` of AutoencoderKL (20
# parameters) runs outside the decoder and is not included. Both use 4 levels (3 upsamplers, factor 8) at
# every size, so pixel sizes mean the same at every size.
#
# SVD: AutoencoderKLTemporalDecoder's TemporalDecoder with stabilityai/stable-video-diffusion-img2vid
# vae/config.json (block_out_channels 128/256/512/512, layers_per_block 2, latent_channels 4; the class
# defaults are a toy).
# 63,579,183 parameters (the whole VAE with its encoder is 97.7 M). GroupNorm(32) is hard-coded: widths are
# multiples of 32.
SVD_VAE_DECODER_CONFIG = _frozen(
    dict(in_channels=4, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2)
)
SVD_VAE_DECODER_TINY = _frozen({**SVD_VAE_DECODER_CONFIG, "block_out_channels": (32, 32, 32, 32),
                                "layers_per_block": 1})
SVD_VAE_DECODER_MEDIUM = _frozen({**SVD_VAE_DECODER_CONFIG, "block_out_channels": (32, 32, 64, 64),
                                  "layers_per_block": 1})
# SD-1.5: AutoencoderKL's Decoder with runwayml/stable-diffusion-v1-5 vae/config.json (the VAE AnimateDiff
# uses). 49,490,179 parameters (the whole VAE is 83.7 M).
SD_VAE_DECODER_CONFIG = _frozen(
    dict(
        in_channels=4,
        out_channels=3,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        act_fn="silu",
    )
)
SD_VAE_DECODER_TINY = _frozen({**SD_VAE_DECODER_CONFIG, "block_out_channels": (16, 16, 32, 32),
                               "layers_per_block": 1, "norm_num_groups": 8})
SD_VAE_DECODER_MEDIUM = _frozen({**SD_VAE_DECODER_CONFIG, "block_out_channels": (32, 32, 64, 64),
                                 "layers_per_block": 1, "norm_num_groups": 8})

# DiT-era video VAEs (Wan, HunyuanVideo, LTX-Video, CogVideoX, Mochi). The module is :class:`VaeDecode`: the
# VAE's own ``decode`` (what the pipelines call), the whole VAE its submodule ``.vae``, every tiling / framewise /
# batch-slicing switch off, so one call decodes the whole latent (Wan's and CogVideoX's decodes still run their
# own causal loops over latent frames: that is their model, not a memory switch). Configs are the VAE classes'
# constructor arguments; at full size the class defaults, which are the released configs (diffusers 0.42:
# Wan-AI/Wan2.1-T2V-14B-Diffusers, hunyuanvideo-community/HunyuanVideo, Lightricks/LTX-Video 0.9.0,
# THUDM/CogVideoX-2b, genmo/mochi-1-preview vae/config.json). Weights count the encoder too (it is part of the
# VAE module; the pipelines keep it resident). Per class: ``AutoencoderKLWan._decode`` has no whole-latent path,
# it always runs the decoder one latent frame at a time with a causal feature cache (export unrolls the loop);
# ``AutoencoderKLCogVideoX._decode`` decodes batches of 2 latent frames with a convolution cache (an odd count:
# the first batch takes the remainder, so 3 latent frames are one batch); Mochi drops the last 5 of its 6x
# temporal expansion (T latent frames -> 6T - 5 frames). Tiny: 3 levels where the class allows (spatial factor 4 for
# HunyuanVideo and CogVideoX; 8 for the rest), each forward well under a second; medium: 4 levels, 32-128
# channels, a few seconds on this CPU. Pixel sizes per size: see ``shapes`` in the ZOO entries.
WAN_VAE_FULL = _frozen({})  # AutoencoderKLWan defaults: base_dim 96, z_dim 16, dim_mult 1/2/4/4, 2 res blocks
WAN_VAE_TINY = _frozen(dict(base_dim=8, z_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, attn_scales=(),
                            temperal_downsample=(False, True, True), latents_mean=(0.0,) * 8,
                            latents_std=(1.0,) * 8))
WAN_VAE_MEDIUM = _frozen(dict(base_dim=32, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1, attn_scales=(),
                              temperal_downsample=(False, True, True)))
HUNYUAN_VAE_FULL = _frozen({})  # 128/256/512/512, 2 layers, GroupNorm(32), mid-block attention, 16 latents
HUNYUAN_VAE_TINY = _frozen(dict(latent_channels=8, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 16, 16),
                                layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
                                temporal_compression_ratio=4, mid_block_add_attention=True))
HUNYUAN_VAE_MEDIUM = _frozen(dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8))
# LTX-Video 0.9.0 (no timestep conditioning). Tiny: the last block has 32 channels for the 3 x 2 x 2 = 12 its
# output convolution makes before the patches are unfolded (the real decoder: 128 for 3 x 4 x 4 = 48).
LTX_VAE_FULL = _frozen({})  # 128/256/512/512, patch 4, 128 latents, 32x spatial, 8x temporal
LTX_VAE_TINY = _frozen(dict(latent_channels=8, block_out_channels=(8, 16, 16),
                            down_block_types=("LTXVideoDownBlock3D",) * 3, decoder_block_out_channels=(32, 32, 32),
                            layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                            spatio_temporal_scaling=(True, True, False),
                            decoder_spatio_temporal_scaling=(True, True, False),
                            decoder_inject_noise=(False, False, False, False), downsample_type=("conv",) * 3,
                            upsample_residual=(False, False, False), upsample_factor=(1, 1, 1),
                            timestep_conditioning=False, patch_size=2, patch_size_t=1))
LTX_VAE_MEDIUM = _frozen(dict(block_out_channels=(32, 64, 64, 64), decoder_block_out_channels=(32, 64, 64, 64),
                              layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1)))
COGVIDEOX_VAE_FULL = _frozen({})  # 128/256/256/512, 3 layers, GroupNorm(32), 16 latents
COGVIDEOX_VAE_TINY = _frozen(dict(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                  up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 16, 16),
                                  latent_channels=8, layers_per_block=1, norm_num_groups=4,
                                  temporal_compression_ratio=4, sample_height=32, sample_width=32))
COGVIDEOX_VAE_MEDIUM = _frozen(dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                                    sample_height=128, sample_width=128))
# Mochi hard-codes GroupNorm(32): channels are multiples of 32.
MOCHI_VAE_FULL = _frozen({})  # decoder 128/256/512/768, layers 3/3/4/6/3, 6x temporal, 8x spatial, 12 latents
MOCHI_VAE_TINY = _frozen(dict(encoder_block_out_channels=(32, 32, 32, 32),
                              decoder_block_out_channels=(32, 32, 32, 32), latent_channels=8,
                              layers_per_block=(1, 1, 1, 1, 1), add_attention_block=(False,) * 5,
                              latents_mean=(0.0,) * 8, latents_std=(1.0,) * 8))
MOCHI_VAE_MEDIUM = _frozen(dict(encoder_block_out_channels=(32, 32, 64, 64),
                                decoder_block_out_channels=(32, 32, 64, 64), layers_per_block=(1, 1, 1, 1, 1),
                                add_attention_block=(False,) * 5))

# Video transformers (the DiT-era denoisers): constructor arguments. Full: the released transformer/config.json
# (Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers, hunyuanvideo-community/HunyuanVideo, Lightricks/LTX-Video
# 0.9.0, THUDM/CogVideoX-5b, genmo/mochi-1-preview). Tiny: 2 heads of 8-12, 1-2 blocks, latent channels the tiny
# VAEs' 8 (Mochi 4), text widths 16; shared with fxstream.dit_pipelines' tiny pipelines. Medium: 4 heads of 32,
# 2 blocks, text width 64: a forward of about a thousand tokens in a second or so on this CPU.
WAN_1_3B_TRANSFORMER = _frozen(dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
))
WAN_14B_TRANSFORMER = _frozen({**WAN_1_3B_TRANSFORMER, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40})
# rope splits head_dim 12 into t/h/w parts (4/4/4)
WAN_TRANSFORMER_TINY = _frozen(dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=8, out_channels=8, text_dim=16,
    freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
))
WAN_TRANSFORMER_MEDIUM = _frozen({**WAN_1_3B_TRANSFORMER, "num_attention_heads": 4, "attention_head_dim": 32,
                                  "text_dim": 64, "freq_dim": 32, "ffn_dim": 512, "num_layers": 2})
HUNYUAN_TRANSFORMER_FULL = _frozen(dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
))
# rope_axes_dim sums to attention_head_dim; pooled_projection_dim is CLIP's width
HUNYUAN_TRANSFORMER_TINY = _frozen(dict(
    in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
    text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
))
HUNYUAN_TRANSFORMER_MEDIUM = _frozen({**HUNYUAN_TRANSFORMER_FULL, "num_attention_heads": 4, "attention_head_dim": 32,
                                      "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1,
                                      "text_embed_dim": 64, "pooled_projection_dim": 32, "rope_axes_dim": (8, 12, 12)})
LTX_TRANSFORMER_FULL = _frozen({})  # LTXVideoTransformer3DModel's defaults: 28 blocks of 32 x 64, 128 latents
# inner dim 24; rope uses inner_dim // 6 frequencies per axis
LTX_TRANSFORMER_TINY = _frozen(dict(
    in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
    cross_attention_dim=24, num_layers=2, caption_channels=16,
))
LTX_TRANSFORMER_MEDIUM = _frozen(dict(num_attention_heads=4, attention_head_dim=36, cross_attention_dim=144,
                                      num_layers=2, caption_channels=64))
# CogVideoX-5b: rotary embeddings (the pipeline computes the table and passes it in), 42 blocks of 48 x 64
COGVIDEOX_TRANSFORMER_FULL = _frozen(dict(
    num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
))
# CogVideoX-2b style (sincos positional embeddings, no rotary), as the tiny pipeline runs it. sample_* are latent
# sizes (8x8 latents: 32x32 pixels through the tiny VAE's 4x), sample_frames pixel frames (3 latent).
COGVIDEOX_TRANSFORMER_TINY = _frozen(dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=8, out_channels=8, time_embed_dim=16,
    text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=4,
))
COGVIDEOX_TRANSFORMER_MEDIUM = _frozen({**COGVIDEOX_TRANSFORMER_FULL, "num_attention_heads": 4,
                                        "attention_head_dim": 32, "time_embed_dim": 64, "text_embed_dim": 64,
                                        "num_layers": 2, "sample_width": 32, "sample_height": 32, "sample_frames": 9,
                                        "max_text_seq_length": 16})
MOCHI_TRANSFORMER_FULL = _frozen({})  # MochiTransformer3DModel's defaults: 48 blocks of 24 x 128, 12 latents
MOCHI_TRANSFORMER_TINY = _frozen(dict(
    patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
    in_channels=4, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4, max_sequence_length=4,
))
MOCHI_TRANSFORMER_MEDIUM = _frozen(dict(num_attention_heads=4, attention_head_dim=32, num_layers=2,
                                        pooled_projection_dim=64, text_embed_dim=64, time_embed_dim=32,
                                        max_sequence_length=16))
# diffusers' memory switches of the video VAEs: all off in the zoo (one decode of the whole latent).
VAE_SWITCHES = ("use_tiling", "use_slicing", "use_framewise_decoding", "use_framewise_encoding")
VIDEO_VAE_CLASSES = ("AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo",
                     "AutoencoderKLCogVideoX", "AutoencoderKLMochi")

# Text encoders' sequence length (CLIP tokenizer max length), for AnimateDiff / ModelScope prompt embeddings.
TEXT_SEQ_LEN = 77
# First timestep of a 50-step DDIM schedule (AnimateDiff's and ModelScope's pipelines' default step count).
DDIM_FIRST_TIMESTEP = 981


# ------------------------------------------------------------------------------------------------------------
# Builders: config -> module (called under the target device context and a seeded RNG).


def _build_svd_unet(cfg: Mapping[str, Any]) -> nn.Module:
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(**cfg)


def _build_animatediff(cfg: Mapping[str, Any]) -> nn.Module:
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet = UNet2DConditionModel(**cfg["unet"])
    adapter = MotionAdapter(**cfg["motion_adapter"])
    return UNetMotionModel.from_unet2d(unet, adapter)


def _build_unet3d(cfg: Mapping[str, Any]) -> nn.Module:
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(**cfg)


def _build_temporal_decoder(cfg: Mapping[str, Any]) -> nn.Module:
    from diffusers.models.autoencoders.autoencoder_kl_temporal_decoder import TemporalDecoder

    return TemporalDecoder(**cfg)


def _build_sd_decoder(cfg: Mapping[str, Any]) -> nn.Module:
    from diffusers.models.autoencoders.vae import Decoder

    return Decoder(**cfg)


class VaeDecode(nn.Module):
    """``forward(z) = vae.decode(z).sample``: a video VAE's own decode, the VAE its registered submodule ``.vae``.

    ``temb`` is LTX-Video's decode timestep (``decode(z, temb)``; None for the other classes and for LTX without
    timestep conditioning). The class's ``decode`` is called, not the instance's: :func:`fxstream.optimize`
    puts the compiled decode on the instance.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        decode = type(self.vae).decode
        out = decode(self.vae, z) if temb is None else decode(self.vae, z, temb)
        return out.sample


def _video_vae_builder(class_name: str) -> Callable[[Mapping[str, Any]], nn.Module]:
    def build(cfg: Mapping[str, Any]) -> nn.Module:
        import diffusers

        vae = getattr(diffusers, class_name)(**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
        for flag in VAE_SWITCHES:
            if hasattr(vae, flag):
                setattr(vae, flag, False)
        return VaeDecode(vae)

    return build


def _transformer_builder(class_name: str) -> Callable[[Mapping[str, Any]], nn.Module]:
    def build(cfg: Mapping[str, Any]) -> nn.Module:
        import diffusers

        return getattr(diffusers, class_name)(**cfg)

    return build


# ------------------------------------------------------------------------------------------------------------
# Example inputs. ``rand(shape)`` draws from the seeded generator in the model dtype on the target device.


@dataclass(frozen=True)
class _InputContext:
    module: nn.Module
    batch: int  # prompts / videos
    cfg_batch: int  # batch after classifier-free guidance doubling
    frames: int
    height: int  # pixels
    width: int
    latent_h: int
    latent_w: int
    dtype: torch.dtype
    device: torch.device
    rand: Callable[[tuple[int, ...]], torch.Tensor]
    size: str = "tiny"

    def scalar(self, value: float | int, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(value, dtype=dtype, device=self.device)


def _svd_unet_inputs(c: _InputContext) -> tuple[tuple, dict]:
    # StableVideoDiffusionPipeline: latent_model_input = cat([latents] * 2) ++ image_latents along channels.
    unet = c.module
    sample = c.rand((c.cfg_batch, c.frames, unet.config.in_channels, c.latent_h, c.latent_w))
    t = c.scalar(SVD_FIRST_TIMESTEP, torch.float32)  # EulerDiscreteScheduler timesteps are float32
    image_embeddings = c.rand((c.cfg_batch, 1, unet.config.cross_attention_dim))
    n_ids = unet.config.projection_class_embeddings_input_dim // unet.config.addition_time_embed_dim
    ids = (SVD_ADDED_TIME_IDS * n_ids)[:n_ids]
    added_time_ids = torch.tensor([ids] * c.cfg_batch, dtype=c.dtype, device=c.device)
    return (sample, t), {"encoder_hidden_states": image_embeddings, "added_time_ids": added_time_ids}


def _text_unet_inputs(c: _InputContext, *, repeat_per_frame: bool = False) -> tuple[tuple, dict]:
    # TextToVideoSDPipeline / AnimateDiffPipeline: latents (B, C, F, h, w); DDIM int64 timesteps; CLIP prompt
    # embeddings (B, 77, cross_attention_dim).
    unet = c.module
    sample = c.rand((c.cfg_batch, unet.config.in_channels, c.frames, c.latent_h, c.latent_w))
    t = c.scalar(DDIM_FIRST_TIMESTEP, torch.int64)
    prompt_embeds = c.rand((c.cfg_batch, TEXT_SEQ_LEN, unet.config.cross_attention_dim))
    if repeat_per_frame:
        prompt_embeds = prompt_embeds.repeat_interleave(c.frames, dim=0)
    return (sample, t), {"encoder_hidden_states": prompt_embeds}


def _animatediff_inputs(c: _InputContext) -> tuple[tuple, dict]:
    # diffusers' UNetMotionModel (0.42) does not repeat the prompt embeddings per frame; AnimateDiffPipeline
    # does (`prompt_embeds.repeat_interleave(repeats=num_frames, dim=0)`): (B * F, 77, 768).
    return _text_unet_inputs(c, repeat_per_frame=True)


def _temporal_decoder_inputs(c: _InputContext) -> tuple[tuple, dict]:
    # AutoencoderKLTemporalDecoder.decode(z, num_frames): z is (batch * frames, 4, h, w), video-major.
    z = c.rand((c.batch * c.frames, c.module.conv_in.in_channels, c.latent_h, c.latent_w))
    image_only_indicator = torch.zeros(c.batch, c.frames, dtype=c.dtype, device=c.device)
    return (z,), {"image_only_indicator": image_only_indicator, "num_frames": c.frames}


def _sd_decoder_inputs(c: _InputContext) -> tuple[tuple, dict]:
    # AutoencoderKL._decode: decoder(post_quant_conv(z)) with z (batch * frames, 4, h, w).
    z = c.rand((c.batch * c.frames, c.module.conv_in.in_channels, c.latent_h, c.latent_w))
    return (z,), {}


def video_vae_factors(vae: nn.Module) -> tuple[int, int, int]:
    """(latent channels, temporal factor, spatial factor) of a DiT-era video VAE, as its pipeline reads them."""
    config = vae.config
    channels = config.get("z_dim", config.get("latent_channels"))
    if type(vae).__name__ == "AutoencoderKLWan":
        return channels, config.scale_factor_temporal, config.scale_factor_spatial
    if type(vae).__name__ == "AutoencoderKLCogVideoX":
        return channels, config.temporal_compression_ratio, 2 ** (len(config.block_out_channels) - 1)
    return channels, vae.temporal_compression_ratio, vae.spatial_compression_ratio


def _video_vae_inputs(c: _InputContext) -> tuple[tuple, dict]:
    # The pipelines' latents: (B, C, 1 + (F - 1) // t, H / s, W / s); the VAE decodes them to 1 + (T - 1) * t
    # frames (Mochi: T * 6 - 5, the same count).
    channels, t, s = video_vae_factors(c.module.vae)
    for arg, value in (("frames", c.frames - 1), ("height", c.height), ("width", c.width)):
        factor = t if arg == "frames" else s
        if value % factor:
            what = "frames - 1" if arg == "frames" else arg
            raise ValueError(f"{arg}: {what} must be divisible by {factor} for {type(c.module.vae).__name__}, "
                             f"got {value}")
    z = c.rand((c.batch, channels, 1 + (c.frames - 1) // t, c.height // s, c.width // s))
    return (z,), {}


# The video transformers' calls: (VAE temporal factor, spatial factor, prompt tokens at full size) per class, as
# their pipelines encode the video and the prompt; tiny and medium prompts have TRANSFORMER_TEXT_TOKENS tokens
# (CogVideoX's transformer takes exactly its max_text_seq_length).
_TRANSFORMER_CALLS = {
    "WanTransformer3DModel": (4, 8, 512),  # WanPipeline: UMT5, max_sequence_length 512
    "HunyuanVideoTransformer3DModel": (4, 8, 256),  # Llama prompt, 256 tokens, + CLIP pooled
    "LTXVideoTransformer3DModel": (8, 32, 128),  # T5, 128 tokens
    "CogVideoXTransformer3DModel": (4, 8, 226),  # T5, 226 tokens
    "MochiTransformer3DModel": (6, 8, 256),  # T5, 256 tokens
}
TRANSFORMER_TEXT_TOKENS = 16


def _transformer_inputs(c: _InputContext) -> tuple[tuple, dict]:
    """One denoising call of a video transformer, keyword for keyword as its pipeline makes it (the timestep is
    the first of the schedule's, as a 1-element tensor: ``t.expand(batch)``)."""
    model, config = c.module, c.module.config
    name = type(model).__name__
    t, s, text_full = _TRANSFORMER_CALLS[name]
    if name == "CogVideoXTransformer3DModel":
        text = config.max_text_seq_length
    else:
        text = text_full if c.size == "full" else TRANSFORMER_TEXT_TOKENS
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[-1]
    for arg, value, factor in (("frames", c.frames - 1, t), ("height", c.height, s * patch),
                               ("width", c.width, s * patch)):
        if value % factor:
            what = "frames - 1" if arg == "frames" else arg
            raise ValueError(f"{arg}: {what} must be divisible by {factor} for {name}, got {value}")
    b, f, h, w = c.cfg_batch, 1 + (c.frames - 1) // t, c.height // s, c.width // s
    channels = config.in_channels
    text_dim = config.get("text_dim") or config.get("text_embed_dim") or config.get("caption_channels")
    prompt = c.rand((b, text, text_dim))

    def full(value: float, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return torch.full(shape, value, dtype=dtype, device=c.device)

    def mask(dtype: torch.dtype) -> torch.Tensor:  # the tokenizer's padding: the last quarter of the prompt
        m = full(1, dtype, b, text)
        if c.device.type != "meta":
            m[:, text - text // 4:] = 0
        return m

    timestep = full(999.0, torch.float32, b)  # the first step of a 1000-step schedule
    if name == "WanTransformer3DModel":
        return (), dict(hidden_states=c.rand((b, channels, f, h, w)), timestep=timestep, encoder_hidden_states=prompt)
    if name == "HunyuanVideoTransformer3DModel":
        return (), dict(hidden_states=c.rand((b, channels, f, h, w)), timestep=timestep.to(c.dtype),
                        encoder_hidden_states=prompt, encoder_attention_mask=mask(c.dtype),
                        pooled_projections=c.rand((b, config.pooled_projection_dim)),
                        guidance=full(6.0 * 1000.0, c.dtype, b))  # guidance_scale 6 * 1000
    if name == "LTXVideoTransformer3DModel":
        # LTXPipeline._pack_latents (patch 1): (B, C, F, H, W) -> (B, F*H*W, C)
        packed = c.rand((b, f * h * w, channels))
        return (), dict(hidden_states=packed, encoder_hidden_states=prompt, timestep=timestep,
                        encoder_attention_mask=mask(torch.bool), num_frames=f, height=h, width=w,
                        rope_interpolation_scale=(t / 25, s, s))  # (temporal / frame_rate 25, spatial, spatial)
    if name == "CogVideoXTransformer3DModel":
        rotary = None
        if config.use_rotary_positional_embeddings:  # CogVideoXPipeline._prepare_rotary_positional_embeddings
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            grid = (h // patch, w // patch)
            crops = get_resize_crop_region_for_grid(grid, config.sample_width // patch, config.sample_height // patch)
            rotary = get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                             temporal_size=f, device=c.device)
        return (), dict(hidden_states=c.rand((b, f, channels, h, w)), encoder_hidden_states=prompt,
                        timestep=full(999, torch.int64, b), image_rotary_emb=rotary)  # DDIM: int64 timesteps
    # MochiTransformer3DModel: latents and timesteps in float32 (the pipeline samples in fp32)
    return (), dict(hidden_states=c.rand((b, channels, f, h, w)), encoder_hidden_states=prompt,
                    timestep=timestep, encoder_attention_mask=mask(torch.bool))


# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry.

    ``default_frames/height/width`` are the pipeline defaults used at size ``"full"`` (pixel sizes, before the
    VAE factor 8); tiny and medium default to 4 frames at 128x128 and 8 frames at 256x256 (see
    :meth:`default_shape`). ``configs`` maps each size to the keyword arguments of ``builder``.
    """

    name: str
    family: str  # "unet" | "transformer" | "vae-decoder"
    description: str
    default_frames: int
    default_height: int
    default_width: int
    module_class: str  # the diffusers class of the built module
    configs: Mapping[str, Mapping[str, Any]] = field(compare=False, repr=False)
    builder: Callable[[Mapping[str, Any]], nn.Module] = field(compare=False, repr=False)
    make_inputs: Callable[[_InputContext], tuple[tuple, dict]] = field(compare=False, repr=False)
    uses_cfg: bool = True  # classifier-free guidance doubles the batch (UNets only)
    max_frames: int | None = None  # e.g. AnimateDiff's motion_max_seq_length
    shapes: Mapping[str, tuple[int, int, int]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def full_config(self) -> Mapping[str, Any]:
        return self.configs["full"]

    @property
    def tiny_config(self) -> Mapping[str, Any]:
        return self.configs["tiny"]

    @property
    def medium_config(self) -> Mapping[str, Any]:
        return self.configs["medium"]

    def default_shape(self, size: str) -> tuple[int, int, int]:
        """(frames, height, width) in pixels used by :func:`build` when they are not given."""
        if size in self.shapes:
            return self.shapes[size]
        if size == "tiny":
            return _TINY_SHAPE
        if size == "medium":
            return _MEDIUM_SHAPE
        return (self.default_frames, self.default_height, self.default_width)


ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="svd",
            family="unet",
            description="Stable Video Diffusion img2vid UNet (UNetSpatioTemporalConditionModel), 14 frames "
            "576x1024, classifier-free guidance always on",
            default_frames=14,
            default_height=576,
            default_width=1024,
            module_class="UNetSpatioTemporalConditionModel",
            configs=_frozen({"tiny": SVD_UNET_TINY, "medium": SVD_UNET_MEDIUM, "full": SVD_UNET_CONFIG}),
            builder=_build_svd_unet,
            make_inputs=_svd_unet_inputs,
        ),
        ModelSpec(
            name="svd-xt",
            family="unet",
            description="Stable Video Diffusion img2vid-xt UNet: the SVD UNet at 25 frames 576x1024",
            default_frames=25,
            default_height=576,
            default_width=1024,
            module_class="UNetSpatioTemporalConditionModel",
            configs=_frozen({"tiny": SVD_UNET_TINY, "medium": SVD_UNET_MEDIUM, "full": SVD_XT_UNET_CONFIG}),
            builder=_build_svd_unet,
            make_inputs=_svd_unet_inputs,
        ),
        ModelSpec(
            name="animatediff",
            family="unet",
            description="AnimateDiff UNetMotionModel: SD-1.5 UNet + motion adapter v1-5-2, 16 frames 512x512",
            default_frames=16,
            default_height=512,
            default_width=512,
            module_class="UNetMotionModel",
            configs=_frozen(
                {"tiny": ANIMATEDIFF_TINY, "medium": ANIMATEDIFF_MEDIUM, "full": ANIMATEDIFF_FULL}
            ),
            builder=_build_animatediff,
            make_inputs=_animatediff_inputs,
            max_frames=MOTION_ADAPTER_V152_CONFIG["motion_max_seq_length"],
        ),
        ModelSpec(
            name="modelscope",
            family="unet",
            # ModelScope's pipeline default (TextToVideoSDPipeline: 16 frames, sample_size 32 * 8 = 256).
            # Zeroscope v2 576w is the same UNet run at 24 frames 320x576: build(..., frames=24, height=320,
            # width=576).
            description="ModelScope text-to-video / Zeroscope v2 UNet3DConditionModel, 16 frames 256x256",
            default_frames=16,
            default_height=256,
            default_width=256,
            module_class="UNet3DConditionModel",
            configs=_frozen(
                {
                    "tiny": MODELSCOPE_UNET_TINY,
                    "medium": MODELSCOPE_UNET_MEDIUM,
                    "full": MODELSCOPE_UNET_CONFIG,
                }
            ),
            builder=_build_unet3d,
            make_inputs=_text_unet_inputs,
        ),
        ModelSpec(
            name="wan2.1-1.3b",
            family="transformer",
            description="Wan 2.1 T2V 1.3B transformer (WanTransformer3DModel), 81 frames 480x832; the pipeline runs the two guidance branches as two calls",
            default_frames=81,
            default_height=480,
            default_width=832,
            module_class="WanTransformer3DModel",
            configs=_frozen({"tiny": WAN_TRANSFORMER_TINY, "medium": WAN_TRANSFORMER_MEDIUM, "full": WAN_1_3B_TRANSFORMER}),
            builder=_transformer_builder("WanTransformer3DModel"),
            make_inputs=_transformer_inputs,
            uses_cfg=False,
            shapes=_frozen({"tiny": (9, 64, 64), "medium": (17, 256, 256)}),
        ),
        ModelSpec(
            name="wan2.1-14b",
            family="transformer",
            description="Wan 2.1 T2V 14B transformer (WanTransformer3DModel), 81 frames 720x1280, one call per guidance branch",
            default_frames=81,
            default_height=720,
            default_width=1280,
            module_class="WanTransformer3DModel",
            configs=_frozen({"tiny": WAN_TRANSFORMER_TINY, "medium": WAN_TRANSFORMER_MEDIUM, "full": WAN_14B_TRANSFORMER}),
            builder=_transformer_builder("WanTransformer3DModel"),
            make_inputs=_transformer_inputs,
            uses_cfg=False,
            shapes=_frozen({"tiny": (9, 64, 64), "medium": (17, 256, 256)}),
        ),
        ModelSpec(
            name="hunyuanvideo",
            family="transformer",
            description="HunyuanVideo transformer (HunyuanVideoTransformer3DModel: 20 dual- and 40 single-stream blocks), 129 frames 720x1280, guidance distilled (one call per step)",
            default_frames=129,
            default_height=720,
            default_width=1280,
            module_class="HunyuanVideoTransformer3DModel",
            configs=_frozen({"tiny": HUNYUAN_TRANSFORMER_TINY, "medium": HUNYUAN_TRANSFORMER_MEDIUM, "full": HUNYUAN_TRANSFORMER_FULL}),
            builder=_transformer_builder("HunyuanVideoTransformer3DModel"),
            make_inputs=_transformer_inputs,
            uses_cfg=False,
            shapes=_frozen({"tiny": (9, 64, 64), "medium": (17, 256, 256)}),
        ),
        ModelSpec(
            name="ltx-video",
            family="transformer",
            description="LTX-Video 0.9.0 transformer (LTXVideoTransformer3DModel), 161 frames 512x704, classifier-free guidance batch",
            default_frames=161,
            default_height=512,
            default_width=704,
            module_class="LTXVideoTransformer3DModel",
            configs=_frozen({"tiny": LTX_TRANSFORMER_TINY, "medium": LTX_TRANSFORMER_MEDIUM, "full": LTX_TRANSFORMER_FULL}),
            builder=_transformer_builder("LTXVideoTransformer3DModel"),
            make_inputs=_transformer_inputs,
            uses_cfg=True,
            shapes=_frozen({"tiny": (9, 128, 128), "medium": (17, 512, 512)}),
        ),
        ModelSpec(
            name="cogvideox-5b",
            family="transformer",
            description="CogVideoX-5b transformer (CogVideoXTransformer3DModel, rotary embeddings), 49 frames 480x720, classifier-free guidance batch",
            default_frames=49,
            default_height=480,
            default_width=720,
            module_class="CogVideoXTransformer3DModel",
            configs=_frozen({"tiny": COGVIDEOX_TRANSFORMER_TINY, "medium": COGVIDEOX_TRANSFORMER_MEDIUM, "full": COGVIDEOX_TRANSFORMER_FULL}),
            builder=_transformer_builder("CogVideoXTransformer3DModel"),
            make_inputs=_transformer_inputs,
            uses_cfg=True,
            shapes=_frozen({"tiny": (9, 64, 64), "medium": (17, 256, 256)}),
        ),
        ModelSpec(
            name="mochi",
            family="transformer",
            description="Mochi 1 transformer (MochiTransformer3DModel), 19 frames 480x848, classifier-free guidance batch",
            default_frames=19,
            default_height=480,
            default_width=848,
            module_class="MochiTransformer3DModel",
            configs=_frozen({"tiny": MOCHI_TRANSFORMER_TINY, "medium": MOCHI_TRANSFORMER_MEDIUM, "full": MOCHI_TRANSFORMER_FULL}),
            builder=_transformer_builder("MochiTransformer3DModel"),
            make_inputs=_transformer_inputs,
            uses_cfg=True,
            shapes=_frozen({"tiny": (7, 64, 64), "medium": (13, 256, 256)}),
        ),
        ModelSpec(
            name="svd-vae-decoder",
            family="vae-decoder",
            description="SVD VAE temporal decoder (AutoencoderKLTemporalDecoder.decoder), all 14 frames at "
            "576x1024 at once",
            default_frames=14,
            default_height=576,
            default_width=1024,
            module_class="TemporalDecoder",
            configs=_frozen(
                {
                    "tiny": SVD_VAE_DECODER_TINY,
                    "medium": SVD_VAE_DECODER_MEDIUM,
                    "full": SVD_VAE_DECODER_CONFIG,
                }
            ),
            builder=_build_temporal_decoder,
            make_inputs=_temporal_decoder_inputs,
            uses_cfg=False,
        ),
        ModelSpec(
            name="sd-vae-decoder",
            family="vae-decoder",
            description="SD-1.5 VAE decoder (AutoencoderKL.decoder) as AnimateDiff uses it: all 16 frames at "
            "512x512 decoded per frame in one batch",
            default_frames=16,
            default_height=512,
            default_width=512,
            module_class="Decoder",
            configs=_frozen(
                {"tiny": SD_VAE_DECODER_TINY, "medium": SD_VAE_DECODER_MEDIUM, "full": SD_VAE_DECODER_CONFIG}
            ),
            builder=_build_sd_decoder,
            make_inputs=_sd_decoder_inputs,
            uses_cfg=False,
        ),
            ModelSpec(
            name="wan-vae-decoder",
            family="vae-decoder",
            description="Wan 2.1 VAE decode (AutoencoderKLWan.decode: its causal loop over latent frames), 81 frames 480x832",
            default_frames=81,
            default_height=480,
            default_width=832,
            module_class="AutoencoderKLWan",
            configs=_frozen({"tiny": WAN_VAE_TINY, "medium": WAN_VAE_MEDIUM, "full": WAN_VAE_FULL}),
            builder=_video_vae_builder("AutoencoderKLWan"),
            make_inputs=_video_vae_inputs,
            uses_cfg=False,
            shapes=_frozen({"tiny": (9, 32, 32), "medium": (9, 128, 128)}),
        ),
        ModelSpec(
            name="hunyuanvideo-vae-decoder",
            family="vae-decoder",
            description="HunyuanVideo VAE decode (AutoencoderKLHunyuanVideo.decode), one decode of 129 frames 720x1280 (no temporal tiles)",
            default_frames=129,
            default_height=720,
            default_width=1280,
            module_class="AutoencoderKLHunyuanVideo",
            configs=_frozen({"tiny": HUNYUAN_VAE_TINY, "medium": HUNYUAN_VAE_MEDIUM, "full": HUNYUAN_VAE_FULL}),
            builder=_video_vae_builder("AutoencoderKLHunyuanVideo"),
            make_inputs=_video_vae_inputs,
            uses_cfg=False,
            shapes=_frozen({"tiny": (9, 32, 32), "medium": (9, 128, 128)}),
        ),
        ModelSpec(
            name="ltx-vae-decoder",
            family="vae-decoder",
            description="LTX-Video 0.9.0 VAE decode (AutoencoderKLLTXVideo.decode), 121 frames 512x768",
            default_frames=121,
            default_height=512,
            default_width=768,
            module_class="AutoencoderKLLTXVideo",
            configs=_frozen({"tiny": LTX_VAE_TINY, "medium": LTX_VAE_MEDIUM, "full": LTX_VAE_FULL}),
            builder=_video_vae_builder("AutoencoderKLLTXVideo"),
            make_inputs=_video_vae_inputs,
            uses_cfg=False,
            shapes=_frozen({"tiny": (9, 32, 32), "medium": (17, 256, 256)}),
        ),
        ModelSpec(
            name="cogvideox-vae-decoder",
            family="vae-decoder",
            description="CogVideoX VAE decode (AutoencoderKLCogVideoX.decode: its batches of latent frames), 49 frames 480x720",
            default_frames=49,
            default_height=480,
            default_width=720,
            module_class="AutoencoderKLCogVideoX",
            configs=_frozen({"tiny": COGVIDEOX_VAE_TINY, "medium": COGVIDEOX_VAE_MEDIUM, "full": COGVIDEOX_VAE_FULL}),
            builder=_video_vae_builder("AutoencoderKLCogVideoX"),
            make_inputs=_video_vae_inputs,
            uses_cfg=False,
            shapes=_frozen({"tiny": (9, 32, 32), "medium": (9, 128, 128)}),
        ),
        ModelSpec(
            name="mochi-vae-decoder",
            family="vae-decoder",
            description="Mochi 1 VAE decode (AutoencoderKLMochi.decode), 163 frames 480x848",
            default_frames=163,
            default_height=480,
            default_width=848,
            module_class="AutoencoderKLMochi",
            configs=_frozen({"tiny": MOCHI_VAE_TINY, "medium": MOCHI_VAE_MEDIUM, "full": MOCHI_VAE_FULL}),
            builder=_video_vae_builder("AutoencoderKLMochi"),
            make_inputs=_video_vae_inputs,
            uses_cfg=False,
            shapes=_frozen({"tiny": (7, 32, 32), "medium": (13, 128, 128)}),
        ),
    )
}


def names() -> list[str]:
    """The zoo's model names, in definition order."""
    return list(ZOO)


@dataclass
class BuiltModel:
    """A built zoo model and one forward's example inputs: ``module(*args, **kwargs)`` runs it.

    ``cfg`` is whether the batch was doubled for classifier-free guidance (always False for VAE decoders).
    ``frames``, ``height`` and ``width`` are the video size in pixels; latents are ``height // 8`` x
    ``width // 8``.
    """

    module: nn.Module
    args: tuple
    kwargs: dict
    spec: ModelSpec
    size: str
    frames: int
    height: int
    width: int
    cfg: bool
    dtype: torch.dtype
    batch: int = 1
    seed: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return _module_device(self.module)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def __call__(self) -> Any:
        """Run one forward on the example inputs (no autograd)."""
        with torch.no_grad():
            return self.module(*self.args, **self.kwargs)


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _check_positive_int(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{arg}: expected a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{arg}: must be positive, got {value}")
    return value


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' construction-time warnings (e.g. UNetMotionModel's float32-modules note)."""
    try:
        from diffusers.utils import logging as dlogging
    except ImportError:  # pragma: no cover
        yield
        return
    old = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(old)


def _rerandomize_zero_layers(module: nn.Module) -> None:
    """Re-initialise conv/linear layers whose weight diffusers zeroed (UNet3D ``temp_convs.*.conv4``)."""
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if (
            isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and isinstance(weight, torch.Tensor)
            and weight.device.type != "meta"
            and not weight.any()
        ):
            sub.reset_parameters()


def build(
    name: str,
    size: str = "tiny",
    *,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    cfg: bool = True,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> BuiltModel:
    """Build zoo model ``name`` at ``size`` with example inputs for one forward.

    Args:
        name: a key of :data:`ZOO` (see :func:`names`).
        size: ``"tiny"``, ``"medium"`` or ``"full"``.
        frames, height, width: video size in pixels (height and width multiples of 8); default per size, see
            :meth:`ModelSpec.default_shape`.
        cfg: double the UNet batch for classifier-free guidance, as the pipelines do (VAE decoders: ignored).
        batch: number of videos.
        dtype: floating dtype of weights and inputs (timesteps keep the scheduler's dtype).
        device: where to build; default ``"meta"`` for ``"full"`` (no memory) and ``"cpu"`` otherwise.
        seed: seeds the weights (``torch.manual_seed`` before construction, in a forked RNG so the global RNG
            is left untouched) and the example inputs (a separate ``torch.Generator``).

    Raises:
        ValueError: naming the argument, for an unknown name or size, non-positive sizes, or height/width not
            divisible by 8.
    """
    if not isinstance(name, str) or name not in ZOO:
        raise ValueError(f"name: unknown model {name!r}; known models: {', '.join(names())}")
    if size not in SIZES:
        raise ValueError(f"size: unknown size {size!r}; expected one of {', '.join(SIZES)}")
    spec = ZOO[name]
    d_frames, d_height, d_width = spec.default_shape(size)
    frames = _check_positive_int("frames", d_frames if frames is None else frames)
    height = _check_positive_int("height", d_height if height is None else height)
    width = _check_positive_int("width", d_width if width is None else width)
    batch = _check_positive_int("batch", batch)
    for arg, value in (("height", height), ("width", width)):
        if value % VAE_SCALE_FACTOR:
            raise ValueError(f"{arg}: must be divisible by {VAE_SCALE_FACTOR} (the VAE factor), got {value}")
    if spec.max_frames is not None and frames > spec.max_frames:
        raise ValueError(f"frames: {name} supports at most {spec.max_frames} frames, got {frames}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    if device is None:
        device = "meta" if size == "full" else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: invalid device {device!r}: {e}") from e

    module = _construct(spec, size, device, dtype, seed)

    cfg_used = bool(cfg) and spec.uses_cfg
    ctx = _InputContext(
        module=module,
        batch=batch,
        cfg_batch=batch * (2 if cfg_used else 1),
        frames=frames,
        height=height,
        width=width,
        latent_h=height // VAE_SCALE_FACTOR,
        latent_w=width // VAE_SCALE_FACTOR,
        dtype=dtype,
        device=device,
        rand=_random_source(seed, dtype, device),
        size=size,
    )
    args, kwargs = spec.make_inputs(ctx)
    return BuiltModel(
        module=module,
        args=args,
        kwargs=kwargs,
        spec=spec,
        size=size,
        frames=frames,
        height=height,
        width=width,
        cfg=cfg_used,
        dtype=dtype,
        batch=batch,
        seed=seed,
    )


def _construct(spec: ModelSpec, size: str, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with _quiet_diffusers(), torch.random.fork_rng(devices=fork_devices), torch.device(device):
        torch.manual_seed(seed)
        module = spec.builder(spec.configs[size])
        _rerandomize_zero_layers(module)
        # Fix parameters created outside the device context (SVD's AlphaBlender.mix_factor is built with
        # torch.Tensor([alpha]) on the CPU) and cast to the requested dtype.
        module.to(device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def _random_source(
    seed: int, dtype: torch.dtype, device: torch.device
) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """Seeded standard-normal tensors: drawn on the CPU (the same values on every device), then moved."""
    if device.type == "meta":
        return lambda shape: torch.empty(shape, dtype=dtype, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
