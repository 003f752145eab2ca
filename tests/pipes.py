"""Helpers for the tests on a saved tiny pipeline (the ``animatediff`` fixture of tests/conftest.py): loaded
with ``DiffusionPipeline.from_pretrained`` (the real loading code, offline), and one UNet call on it."""

from __future__ import annotations

import torch


def load(folder: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_call(pipe, frames: int = 2, size: int = 8) -> torch.Tensor:
    """One call of ``pipe.unet`` on seeded inputs: ``frames`` latent frames of ``size`` x ``size``, one text
    embedding per frame (as the zoo)."""
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, frames, size, size, generator=g)
    text = torch.randn(frames, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor(500), encoder_hidden_states=text, return_dict=False)[0]


def slicing_budget_gb(pipe, frames: int = 2, size: int = 8) -> float:
    """A budget for ``fxstream.optimize(pipe, budget_gb=...)`` under which the UNet's plan slices for
    ``unet_call(pipe, frames, size)``: the pipeline's resident weights plus half the UNet's eager activation
    peak on that call, measured on ``pipe`` (not optimized yet).

    The tests of diffusers' switches and tools use it rather than the minimum (``"min"``): here a budget plans
    about twice as fast as the minimum, and still slices the UNet's transformer blocks, motion modules and up
    blocks.
    """
    import fxstream
    from fxstream.module import installed

    assert installed(pipe.unet) is None, "measure the plain UNet"
    peak = fxstream.measure(unet_call, pipe, frames, size).activation_peak_bytes
    result = fxstream.optimize(pipe, "min")  # compiles nothing before a call: the resident weights only
    result.restore()
    return (result.resident_weight_bytes + peak // 2) / 2**30

