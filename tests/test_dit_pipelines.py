"""The tiny DiT-era pipelines (fxstream.dit_pipelines) generate, offline, the frames their calls ask for, and the
same frames again from the same generator (what the exactness comparisons of optimised pipelines rest on)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fxstream import dit_pipelines, models

PROMPT = "a red fox"  # the T5 tokenizers are per character: 11 tokens with </s>, under TEXT_SEQ_LEN
STEPS = 2
# name -> (call kwargs, frames): each pipeline's divisibility rules (Wan / HunyuanVideo: height and width multiples
# of 16; LTX: of 32; frames 4k + 1 through the 4x temporal VAEs, Mochi's 6T - 5 of T latent frames).
CALLS = {
    "wan": (dict(num_frames=9, height=32, width=32), 9),
    "wan-i2v": (dict(num_frames=9, height=32, width=32), 9),
    "hunyuanvideo": (dict(num_frames=9, height=32, width=32), 9),
    "ltx": (dict(num_frames=9, height=32, width=32), 9),
    "cogvideox": (dict(num_frames=9, height=32, width=32), 9),
    "mochi": (dict(num_frames=7, height=32, width=32), 7),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_ftfy(monkeypatch):
    """WanImageToVideoPipeline's ``basic_clean`` calls ``ftfy.fix_text`` whether or not ftfy is installed (its import
    is conditional, the call is not: diffusers 0.42 pipeline_wan_i2v.py ``text = ftfy.fix_text(text)``); without
    ftfy, do what WanPipeline's ``basic_clean`` does then: leave the text as it is."""
    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):
        monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)


def _build(name: str, seed: int = 0):
    """``dit_pipelines.build`` as ``fxstream.pipelines.build`` calls it: seeded, then eval and frozen."""
    with models._quiet_diffusers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = dit_pipelines.build(name)
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                models._rerandomize_zero_layers(module)
                module.eval()
                module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kwargs(name: str) -> dict:
    kwargs = dict(CALLS[name][0], prompt=PROMPT, num_inference_steps=STEPS, output_type="pt",
                  max_sequence_length=dit_pipelines.TEXT_SEQ_LEN)
    if name == "wan-i2v":
        pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        kwargs["image"] = Image.fromarray(pixels)
    return kwargs


@pytest.mark.usefixtures("no_ftfy")
@pytest.mark.parametrize("name", dit_pipelines.NAMES)
def test_generates_the_same_frames_from_the_same_generator(name):
    pipe = _build(name)
    kwargs = _kwargs(name)
    first = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    again = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    frames = CALLS[name][1]
    assert first.shape == (1, frames, 3, kwargs["height"], kwargs["width"])
    assert torch.isfinite(first).all()
    assert first.std() > 0  # not a constant video: every component ran on random weights
    assert torch.equal(first, again)


def test_unknown_name_or_size_is_named():
    with pytest.raises(ValueError, match="name:"):
        dit_pipelines.build("sora")
    with pytest.raises(ValueError, match="size:"):
        dit_pipelines.build("wan", "medium")


def test_hunyuan_prompt_template_crops_where_the_prompt_starts():
    """HunyuanVideoPipeline drops the first ``crop_start`` (95) tokens: the template's system prefix on Llama 3's
    tokenizer, and on the tiny one."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    tokenizer = dit_pipelines.build("hunyuanvideo").tokenizer
    template, crop_start = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    assert len(tokenizer(template.split("{}")[0]).input_ids) == crop_start
    ids = tokenizer(template.format(PROMPT)).input_ids
    assert tokenizer.decode(ids[crop_start:]) == PROMPT + "<|eot_id|>"
