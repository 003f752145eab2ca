"""Tiny random-weight diffusers pipelines of the DiT-era video models, built from configs (tests, CPU benchmarks).

    pipe = dit_pipelines.build("wan")       # a WanPipeline; nothing is downloaded
    video = pipe("a cat", num_frames=9, height=32, width=32, num_inference_steps=2,
                 max_sequence_length=dit_pipelines.TEXT_SEQ_LEN, output_type="pt").frames   # (1, 9, 3, 32, 32)

:func:`build` only constructs: the caller (:func:`fxstream.pipelines.build`) seeds the RNG, puts every module in
eval mode without gradients and re-randomises zero-initialised layers. The VAEs take the model zoo's tiny configs
(:mod:`fxstream.models`) with their tiling / framewise switches at the class defaults, as ``from_pretrained``
leaves them; the transformers take the tiny configs below, shared with ``tests/dit_models.py``, changed only where
a pipeline needs it; text encoders have one layer (or the few a pipeline reads hidden states from), tokenizers are
built in memory, and the schedulers carry their released configs' key settings.

Working calls (the pipelines' divisibility rules): ``wan``, ``hunyuanvideo``, ``cogvideox``, ``ltx``: 9 frames,
32x32 (``wan-i2v`` also takes ``image``); ``mochi``: 7 frames, 32x32 (Mochi's VAE makes 6T - 5 frames of T latent
frames). Pass ``max_sequence_length=TEXT_SEQ_LEN`` (CogVideoX's transformer needs exactly that many text tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

# the tiny transformer configs are the model zoo's, re-exported for tests/dit_models.py
from fxstream.models import (COGVIDEOX_TRANSFORMER_TINY, HUNYUAN_TRANSFORMER_TINY, LTX_TRANSFORMER_TINY,
                             MOCHI_TRANSFORMER_TINY, WAN_TRANSFORMER_TINY)

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = ["NAMES", "TEXT_SEQ_LEN", "build", "WAN_TRANSFORMER_TINY", "LTX_TRANSFORMER_TINY",
           "COGVIDEOX_TRANSFORMER_TINY", "HUNYUAN_TRANSFORMER_TINY", "MOCHI_TRANSFORMER_TINY"]

NAMES = ("wan", "wan-i2v", "hunyuanvideo", "ltx", "cogvideox", "mochi")
_SIZES = ("tiny",)
# Prompt tokens per text encoder call: the pipelines' max_sequence_length (their defaults, 226 to 512 tokens, would
# make the text the largest part of these tiny models; CogVideoX's transformer is sized for exactly this many).
TEXT_SEQ_LEN = 16
_IMAGE_WIDTH = 16  # Wan I2V's CLIP vision encoder

# ----------------------------------------------------------------------------------------------------------------
# Schedulers: the pipelines' scheduler classes with the released scheduler configs' settings.

# Wan 2.1 (Wan-AI/Wan2.1-*-Diffusers ship UniPCMultistepScheduler with flow_shift 3.0; the pipelines' type hint,
# and diffusers' conversion script, FlowMatchEulerDiscreteScheduler with the same shift).
_WAN_SCHEDULER = dict(shift=3.0)
_HUNYUAN_SCHEDULER = dict(shift=7.0)  # hunyuanvideo-community/HunyuanVideo
_LTX_SCHEDULER = dict(  # Lightricks/LTX-Video: resolution-dependent shift (the pipeline passes mu)
    base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05, shift=1.0, shift_terminal=0.1,
    use_dynamic_shifting=True,
)
_MOCHI_SCHEDULER = dict(invert_sigmas=True)  # genmo/mochi-1-preview
_COGVIDEOX_SCHEDULER = dict(  # THUDM/CogVideoX-2b (CogVideoXDDIMScheduler)
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0, steps_offset=0,
    timestep_spacing="trailing",
)


# Full size, on the meta device, for planning (fxstream.plan_pipeline): the released pipelines' parts.
# UMT5-XXL (google/umt5-xxl, Wan-AI/Wan2.1-T2V-*-Diffusers text_encoder/config.json): 5.68 B parameters.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# T5 v1.1 XXL's encoder (google/t5-v1_1-xxl: LTX-Video's, CogVideoX's and Mochi's text_encoder): 4.76 B parameters.
T5_XXL = dict(UMT5_XXL, vocab_size=32128)
# name -> (pipeline class, zoo transformer, zoo VAE decode, text encoder); the VAEs are the zoo's full configs with
# every tiling / framewise switch off (the exact whole decode fxstream streams).
FULL_PIPELINES = {
    "wan2.1-1.3b": ("WanPipeline", "wan2.1-1.3b", "wan-vae-decoder", "umt5"),
    "wan2.1-14b": ("WanPipeline", "wan2.1-14b", "wan-vae-decoder", "umt5"),
    "ltx-video": ("LTXPipeline", "ltx-video", "ltx-vae-decoder", "t5"),
    "cogvideox-5b": ("CogVideoXPipeline", "cogvideox-5b", "cogvideox-vae-decoder", "t5"),
    "mochi": ("MochiPipeline", "mochi", "mochi-vae-decoder", "t5"),
}
FULL_NAMES = tuple(FULL_PIPELINES)
_FULL_SCHEDULERS = {"WanPipeline": ("FlowMatchEulerDiscreteScheduler", _WAN_SCHEDULER),
                    "LTXPipeline": ("FlowMatchEulerDiscreteScheduler", _LTX_SCHEDULER),
                    "CogVideoXPipeline": ("CogVideoXDDIMScheduler", _COGVIDEOX_SCHEDULER),
                    "MochiPipeline": ("FlowMatchEulerDiscreteScheduler", _MOCHI_SCHEDULER)}


def build_full(name: str) -> DiffusionPipeline:
    """The released ``name`` pipeline's architecture (one of :data:`FULL_NAMES`), constructed in the caller's
    device context (the meta device: no memory); ``fxstream.pipelines.build(name, "full")`` calls it."""
    import diffusers
    import torch
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    from fxstream import models

    if name not in FULL_PIPELINES:
        raise ValueError(f"name: unknown pipeline {name!r}; expected one of {', '.join(FULL_NAMES)}")
    pipeline, transformer, decode, text = FULL_PIPELINES[name]
    spec, vae_spec = models.ZOO[transformer], models.ZOO[decode]
    scheduler_class, scheduler_config = _FULL_SCHEDULERS[pipeline]
    with torch.device("cpu"):
        scheduler = getattr(diffusers, scheduler_class)(**scheduler_config)
    encoder = (UMT5EncoderModel(UMT5Config(**UMT5_XXL)) if text == "umt5"
               else T5EncoderModel(T5Config(**T5_XXL)))
    return getattr(diffusers, pipeline)(
        vae=vae_spec.builder(vae_spec.configs["full"]).vae, transformer=spec.builder(spec.configs["full"]),
        scheduler=scheduler, tokenizer=_t5_tokenizer(), text_encoder=encoder)


def build(name: str, size: str = "tiny") -> DiffusionPipeline:
    """A ``name`` pipeline (one of :data:`NAMES`) of random fp32 weights on the CPU, constructed only (see above)."""
    if name not in NAMES:
        raise ValueError(f"name: unknown pipeline {name!r}; expected one of {', '.join(NAMES)}")
    if size not in _SIZES:
        raise ValueError(f"size: expected one of {', '.join(_SIZES)}, got {size!r}")
    return _BUILDERS[name]()


def _build_wan(image: bool = False) -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
    from diffusers import WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    vae = _vae("wan-vae-decoder", "AutoencoderKLWan")
    config = dict(WAN_TRANSFORMER_TINY)
    if image:
        # WanImageToVideoPipeline feeds cat([noise latents, 4 first-frame mask channels (vae_scale_factor_temporal),
        # image-condition latents]) and the CLIP image embeds, through added K/V projections (Wan2.1-I2V:
        # image_dim 1280, CLIP ViT-H's width; added_kv_proj_dim 5120, the transformer's inner dim).
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        config.update(in_channels=2 * vae.config.z_dim + vae.config.scale_factor_temporal, image_dim=_IMAGE_WIDTH,
                      added_kv_proj_dim=inner)
    transformer = WanTransformer3DModel(**config)
    parts = dict(
        vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**_WAN_SCHEDULER),
        tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder(transformer.config.text_dim, umt5=True),
    )
    if not image:
        return WanPipeline(**parts)
    # encode_image takes hidden_states[-2], the penultimate layer (of the released ViT-H/14's 32): two layers here.
    # The processor resizes to 224x224; patches of 32 pixels: 49 tokens.
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=_IMAGE_WIDTH, intermediate_size=2 * _IMAGE_WIDTH, num_hidden_layers=2, num_attention_heads=2,
        image_size=224, patch_size=32,
    ))
    return WanImageToVideoPipeline(
        **parts, image_encoder=image_encoder, image_processor=CLIPImageProcessor(crop_size=224, size=224),
    )


def _build_hunyuan() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    from fxstream.pipelines import _text_encoder, _tokenizer

    transformer = HunyuanVideoTransformer3DModel(**HUNYUAN_TRANSFORMER_TINY)
    tokenizer = _llama_tokenizer()
    return HunyuanVideoPipeline(
        vae=_vae("hunyuanvideo-vae-decoder", "AutoencoderKLHunyuanVideo"), transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**_HUNYUAN_SCHEDULER), tokenizer=tokenizer,
        text_encoder=_llama(transformer.config.text_embed_dim, len(tokenizer)),
        # CLIP-L's pooled output (its width, not its projection) is the transformer's pooled projection input
        tokenizer_2=_tokenizer(), text_encoder_2=_text_encoder(transformer.config.pooled_projection_dim),
    )


def _build_ltx() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    transformer = LTXVideoTransformer3DModel(**LTX_TRANSFORMER_TINY)
    return LTXPipeline(
        vae=_vae("ltx-vae-decoder", "AutoencoderKLLTXVideo"), transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**_LTX_SCHEDULER), tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(transformer.config.caption_channels),
    )


def _build_cogvideox() -> DiffusionPipeline:
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    # The patch embedding adds its positional table, max_text_seq_length + patches long, to the text and video
    # tokens joined (diffusers/models/embeddings.py, CogVideoXPatchEmbed.forward): the prompt must be exactly
    # max_text_seq_length tokens, i.e. the call's max_sequence_length.
    transformer = CogVideoXTransformer3DModel(**{**COGVIDEOX_TRANSFORMER_TINY, "max_text_seq_length": TEXT_SEQ_LEN})
    return CogVideoXPipeline(
        vae=_vae("cogvideox-vae-decoder", "AutoencoderKLCogVideoX"), transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(**_COGVIDEOX_SCHEDULER), tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(transformer.config.text_embed_dim),
    )


def _build_mochi() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    # MochiPipeline hard-codes 12 latent channels where it denormalises (pipeline_mochi.py:
    # latents_mean.view(1, 12, 1, 1, 1)) whenever the VAE config has latents_mean/std, as the released one does:
    # so the pipeline's VAE is the zoo's tiny config with 12 latent channels (identity mean / std, as the zoo's),
    # and the transformer denoises 12 channels (the never-crash config's 4 is a smaller latent of its own).
    latents = 12
    vae = _vae("mochi-vae-decoder", "AutoencoderKLMochi", latent_channels=latents, latents_mean=(0.0,) * latents,
               latents_std=(1.0,) * latents)
    transformer = MochiTransformer3DModel(**{**MOCHI_TRANSFORMER_TINY, "in_channels": latents})
    return MochiPipeline(
        vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**_MOCHI_SCHEDULER),
        tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder(transformer.config.text_embed_dim),
    )


_BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "wan": _build_wan,
    "wan-i2v": lambda: _build_wan(image=True),
    "hunyuanvideo": _build_hunyuan,
    "ltx": _build_ltx,
    "cogvideox": _build_cogvideox,
    "mochi": _build_mochi,
}


def _vae(zoo_name: str, class_name: str, **overrides: Any) -> nn.Module:
    """The whole VAE (encoder too) of the zoo's tiny decoder config, its memory switches at the class defaults."""
    import diffusers

    from fxstream import models

    config = {**models.ZOO[zoo_name].configs["tiny"], **overrides}
    return getattr(diffusers, class_name)(**{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})


# ----------------------------------------------------------------------------------------------------------------
# Text encoders and tokenizers, built in memory.


def _t5_tokenizer() -> Any:
    """A T5 tokenizer (SentencePiece unigram, ``</s>`` appended, ``<pad>`` 0) whose pieces are single characters."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -1.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _t5_encoder(width: int, umt5: bool = False) -> nn.Module:
    """One-layer T5 v1.1 (gated GELU) encoder; UMT5 (Wan) has per-layer relative position biases."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    return model_class(config_class(
        vocab_size=len(_t5_tokenizer()), d_model=width, d_kv=width // 2, d_ff=2 * width, num_layers=1, num_heads=2,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


# Llama 3's pre-tokenizer pattern (HunyuanVideo's text encoder is a Llava-Llama-3).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Positions: HunyuanVideo's template prefix (95 tokens) + the pipeline's default max_sequence_length 256, rounded up.
_LLAMA_POSITIONS = 512


def _llama_tokenizer() -> Any:
    """A Llama-3-style byte-level BPE tokenizer on which HunyuanVideo's prompt template crops as on the real one.

    The pipeline drops the first ``crop_start`` = 95 tokens, the template's system prefix as Llama 3 tokenizes it:
    each special token and each pre-tokenizer chunk of the template is one token. So the vocabulary holds the
    specials, the 256 byte symbols, and every chunk of the template; the BPE has no merges and matches whole chunks
    first (``ignore_merges``, as Llama 3's), so the template is 95 tokens with BOS and any other text is bytes.
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    vocab = {s: i for i, s in enumerate(_LLAMA3_SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    for text in re.split("|".join(map(re.escape, _LLAMA3_SPECIALS)), DEFAULT_PROMPT_TEMPLATE["template"]):
        for chunk, _ in pre_tokenizer.pre_tokenize_str(text):
            vocab.setdefault(chunk, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(_LLAMA3_SPECIALS))
    bos, eos = _LLAMA3_SPECIALS[:2]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])],
    )
    # Llama 3's tokenizer_config names PreTrainedTokenizerFast (LlamaTokenizerFast would swap in a Metaspace one).
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=eos,
                                   model_max_length=_LLAMA_POSITIONS)


def _llama(width: int, vocab_size: int) -> nn.Module:
    """Llama decoder as HunyuanVideo's text encoder: 3 layers, for the pipeline reads ``hidden_states[-3]``.

    ``_get_llama_prompt_embeds`` skips the last 2 layers (``num_hidden_layers_to_skip=2``), so the embeds are the
    first layer's output (the released model: layer 30 of 32).
    """
    from transformers import LlamaConfig, LlamaModel

    ids = {s: i for i, s in enumerate(_LLAMA3_SPECIALS)}
    return LlamaModel(LlamaConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=_LLAMA_POSITIONS,
        bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|end_of_text|>"],
        pad_token_id=ids["<|end_of_text|>"],
    ))
