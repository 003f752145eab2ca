"""``fxstream.plan_pipeline``: will a whole video pipeline fit on a card, eager and with fxstream?

    plan = fxstream.plan_pipeline("svd-xt", budget_gb=8)          # full size, on the meta device: seconds
    print(plan.table()); plan.fits, plan.bound
    plan = fxstream.plan_pipeline(pipe, budget_gb=8, frames=25)   # a pipeline you built or loaded

A pipeline runs in phases, one component at a time: its encoders (the prompt's text encoder, SVD's CLIP image
encoder and the VAE encoding the conditioning image), one denoiser step (the UNet, the batch doubled for
guidance; a DiT-era transformer as its pipeline calls it, Wan's once for each of the guidance pair;
repeated every step, so its peak is the step's), and the VAE decode of the frames as the pipeline
decodes them (``decode_chunk_size`` frames a call; the frames of earlier calls stay held). Each phase's peak is
the weights resident while it runs plus its activations; the pipeline's peak is the largest phase's. Without
offloading every component stays resident; with ``offload=True`` (diffusers' model CPU offload, as
``fxstream.optimize(pipe, offload=True)`` turns it on) only the running component's weights are, and each
component's weights move to the device once a generation (reported with a predicted transfer time).

fxstream compiles the phases :func:`fxstream.optimize` compiles (the denoiser and the VAE decoder) under the
budget left by the resident weights; the encoders run eager, as they do under ``optimize``, and are planned as
eager. The budget is the card's memory: a process on a CUDA device also holds the CUDA context and the caching
allocator's slack, which no tensor accounts for, so the tensors get ``budget - allowance`` (see
:func:`tensor_budget_bytes`; target ``"cpu"``: no allowance). ``plan.optimize_budget_gb`` is the value to give
``fxstream.optimize`` for the same plan.

Everything is planned on the modules as they are: on the meta device (``fxstream.pipelines.build(name,
"full")``, what a name means here) nothing is allocated or computed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from passes.memory import format_bytes

GiB = 2**30
# The CUDA context and library handles a PyTorch process holds on the device outside any tensor: 287 MiB and
# 426 MiB measured with lazy module loading (the default since CUDA 11.7) in pytorch/pytorch#86509 and
# unslothai/unsloth-zoo#1053, more with cuDNN and cuBLAS initialised; 512 MiB assumed until benchmarks/gpu.py
# measures it on a lent card.
CUDA_CONTEXT_BYTES = 512 * 2**20
# The caching allocator's rounding and fragmentation above the bytes of live tensors: 5% assumed.
ALLOCATOR_SLACK = 0.05
# Host-to-device copy rate of model CPU offload's moves (pageable memory over PCIe 4.0 x16): 10 GB/s assumed.
OFFLOAD_BYTES_PER_S = 10e9
# Pipelines this plans by name: fxstream.pipelines.build(name, "full") and their pipelines' call defaults
# (frames, height, width, decode_chunk_size; None: every frame in one decode call).
PIPELINE_DEFAULTS: dict[str, tuple[int, int, int, int | None]] = {
    "svd": (14, 576, 1024, None),  # StableVideoDiffusionPipeline: decode_chunk_size None = all frames
    "svd-xt": (25, 576, 1024, None),
    "animatediff": (16, 512, 512, 16),  # AnimateDiffPipeline: decode_chunk_size 16
    "modelscope": (16, 256, 256, None),  # TextToVideoSDPipeline decodes all frames at once
    # the DiT-era pipelines (the zoo transformers' sizes): their VAEs decode every frame in one call
    "wan2.1-1.3b": (81, 480, 832, None),
    "wan2.1-14b": (81, 720, 1280, None),
    "ltx-video": (161, 512, 704, None),
    "cogvideox-5b": (49, 480, 720, None),
    "mochi": (19, 480, 848, None),
}
_CLASSES = {"StableVideoDiffusionPipeline": "svd", "AnimateDiffPipeline": "animatediff",
            "TextToVideoSDPipeline": "modelscope", "WanPipeline": "wan", "LTXPipeline": "ltx",
            "CogVideoXPipeline": "cogvideox", "MochiPipeline": "mochi"}
_KIND_DEFAULTS = {"svd": "svd", "animatediff": "animatediff", "modelscope": "modelscope", "wan": "wan2.1-1.3b",
                  "ltx": "ltx-video", "cogvideox": "cogvideox-5b", "mochi": "mochi"}
# The DiT-era pipelines: (zoo transformer, zoo VAE decode, prompt tokens at full size, guidance as the pipeline
# runs it: "twice" = the transformer called once for each of the pair, batch 1; "batch" = one call of batch 2).
_DIT_KINDS = {
    "wan": ("wan2.1-1.3b", "wan-vae-decoder", 512, "twice"),  # max_sequence_length 512
    "ltx": ("ltx-video", "ltx-vae-decoder", 128, "batch"),
    "cogvideox": ("cogvideox-5b", "cogvideox-vae-decoder", 226, "batch"),
    "mochi": ("mochi", "mochi-vae-decoder", 256, "batch"),
}
_TEXT_TOKENS = 77  # CLIP prompts are padded to the tokenizer's model_max_length
_CLIP_IMAGE = 224  # SVD resizes the conditioning image to 224x224 for CLIP


def tensor_budget_bytes(budget_bytes: int, target: str = "cuda") -> int:
    """What tensors may use of a device with ``budget_bytes`` of memory: on CUDA, less the context
    (:data:`CUDA_CONTEXT_BYTES`) and the allocator's slack (:data:`ALLOCATOR_SLACK` of the tensors); on the
    CPU, all of it."""
    if target != "cuda":
        return budget_bytes
    return max(0, int((budget_bytes - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK)))


# budget_gb="auto" on the CPU: this much of the RAM available now (the rest for the process and the system).
CPU_AUTO_FRACTION = 0.9


def available_bytes(device: str | torch.device) -> int:
    """Bytes tensors may still take on ``device``: on CUDA, the free memory plus what PyTorch's allocator has
    reserved and could reuse (the context is already paid), less the allocator's slack; on the CPU,
    :data:`CPU_AUTO_FRACTION` of the available RAM (``MemAvailable``)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int((free + torch.cuda.memory_reserved(device)) / (1 + ALLOCATOR_SLACK))
    return int(_available_ram() * CPU_AUTO_FRACTION)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_budget_bytes(device: str | torch.device, resident_bytes: int) -> int:
    """``budget_gb="auto"``: the budget that fits the device as it is now, for a pipeline whose components hold
    ``resident_bytes`` of weights (on CUDA they are already in the allocator's reserve, and count there; on the
    CPU they are already taken from the RAM, so they are added back). The budget chosen is printed to stderr."""
    import sys

    available = available_bytes(device)
    budget = available if torch.device(device).type == "cuda" else available + resident_bytes
    print(f"fxstream: budget auto: {format_bytes(budget)} (what fits {device} now; budget_gb / --budget-gb to "
          "choose, 'min' for the least memory)", file=sys.stderr)
    return budget


def device_bytes(tensor_bytes: int, target: str = "cuda") -> int:
    """The device memory ``tensor_bytes`` of live tensors need: on CUDA, with the allocator's slack and the
    context (:func:`tensor_budget_bytes` is its inverse); on the CPU, the same."""
    if target != "cuda":
        return tensor_bytes
    return math.ceil(tensor_bytes * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES


@dataclass
class PhasePlan:
    """One phase of a pipeline: a component's call, its memory eager and with fxstream (bytes).

    other_weight_bytes: weights of the other components resident while it runs; own_weight_bytes: the running
    module's; held_bytes: tensors the pipeline holds meanwhile that the call does not own (decoded frames of
    earlier decode calls). compiled: fxstream compiles this phase (else it runs eager, also under fxstream).
    planned_activation_bytes: None when no plan fits its share; floor_activation_bytes: the least slicing
    reaches (only computed when the share is missed, or with no budget).
    """

    name: str
    component: str
    calls: str
    compiled: bool
    own_weight_bytes: int
    other_weight_bytes: int
    held_bytes: int
    eager_activation_bytes: int
    planned_activation_bytes: int | None
    floor_activation_bytes: int | None = None
    share_bytes: int | None = None
    sliced_groups: int = 0
    seconds: float = 0.0

    @property
    def resident_bytes(self) -> int:
        return self.other_weight_bytes + self.own_weight_bytes + self.held_bytes

    @property
    def eager_peak_bytes(self) -> int:
        return self.resident_bytes + self.eager_activation_bytes

    @property
    def peak_bytes(self) -> int | None:
        """With fxstream (None: no plan fits the share)."""
        activation = self.eager_activation_bytes if not self.compiled else self.planned_activation_bytes
        return None if activation is None else self.resident_bytes + activation

    @property
    def least_bytes(self) -> int:
        """The least this phase can run in with fxstream."""
        activation = self.planned_activation_bytes if self.floor_activation_bytes is None \
            else self.floor_activation_bytes
        if not self.compiled or activation is None:
            activation = self.eager_activation_bytes
        return self.resident_bytes + activation


@dataclass
class PipelinePlan:
    """The memory of one generation of a pipeline, eager and with fxstream; see the module docstring."""

    pipeline: str
    frames: int
    height: int
    width: int
    dtype: str
    decode_chunk_size: int
    target: str
    offload: bool
    budget_bytes: int | None  # the device's memory (None: no budget, fxstream's minimum)
    tensor_budget_bytes: int | None  # what tensors may use of it
    components: dict[str, int]  # component -> weight bytes
    phases: list[PhasePlan] = field(default_factory=list)
    offload_bytes: int = 0  # host-to-device bytes a generation moves (offload)
    seconds: float = 0.0

    @property
    def resident_weight_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def eager_peak_bytes(self) -> int:
        return max(p.eager_peak_bytes for p in self.phases)

    @property
    def peak_bytes(self) -> int | None:
        """The whole pipeline's peak with fxstream (None: some phase has no plan within the budget)."""
        peaks = [p.peak_bytes for p in self.phases]
        return None if any(p is None for p in peaks) else max(peaks)

    @property
    def allowance_bytes(self) -> int:
        """Context and allocator allowance at the planned peak (0 off CUDA)."""
        peak = self.peak_bytes if self.peak_bytes is not None else max(p.least_bytes for p in self.phases)
        return device_bytes(peak, self.target) - peak

    @property
    def fits(self) -> bool | None:
        """Whether every phase fits the budget with fxstream (None: no budget given)."""
        if self.tensor_budget_bytes is None:
            return None
        return all(p.peak_bytes is not None and p.peak_bytes <= self.tensor_budget_bytes for p in self.phases)

    @property
    def eager_fits(self) -> bool | None:
        if self.tensor_budget_bytes is None:
            return None
        return self.eager_peak_bytes <= self.tensor_budget_bytes

    @property
    def bounding_phase(self) -> PhasePlan:
        """The phase that sets the pipeline's least memory with fxstream."""
        return max(self.phases, key=lambda p: p.least_bytes)

    @property
    def bound(self) -> str:
        """What bounds the plan, in one sentence."""
        p = self.bounding_phase
        if p.compiled:
            reach = (f"its activations cannot go below {format_bytes(p.floor_activation_bytes)}"
                     if p.floor_activation_bytes is not None else
                     f"its activations are {format_bytes(p.planned_activation_bytes or 0)}")
        else:
            reach = f"it runs eager ({format_bytes(p.eager_activation_bytes)} of activations)"
        parts = [f"{format_bytes(p.other_weight_bytes + p.own_weight_bytes)} of weights resident"]
        if p.held_bytes:
            parts.append(f"{format_bytes(p.held_bytes)} of frames held")
        return f"the {p.name} ({p.calls}): {' and '.join(parts)}, and {reach}"

    @property
    def least_bytes(self) -> int:
        """The least device memory the pipeline needs with fxstream (tensors, plus the allowance on CUDA)."""
        return device_bytes(max(p.least_bytes for p in self.phases), self.target)

    @property
    def optimize_budget_gb(self) -> float | None:
        """The ``budget_gb`` to give :func:`fxstream.optimize` for this plan (the tensors' share of the card)."""
        return None if self.tensor_budget_bytes is None else math.floor(self.tensor_budget_bytes / GiB * 100) / 100

    @property
    def offload_seconds(self) -> float:
        return self.offload_bytes / OFFLOAD_BYTES_PER_S

    def fits_line(self) -> str:
        if self.budget_bytes is None:
            return (f"least memory with fxstream: {format_bytes(self.least_bytes)}"
                    + (" (with the CUDA allowance)" if self.target == "cuda" else "") + f"; bound by {self.bound}")
        budget = format_bytes(self.budget_bytes)
        if self.fits:
            return (f"fits in {budget}: yes (peak {format_bytes(self.peak_bytes)} of tensors within "
                    f"{format_bytes(self.tensor_budget_bytes)}; eager: {'yes' if self.eager_fits else 'no'})")
        return (f"fits in {budget}: no; the least is {format_bytes(self.least_bytes)}, bound by {self.bound}")

    def table(self) -> str:
        from tabulate import tabulate

        rows = []
        for p in self.phases:
            share = ("-" if p.share_bytes is None else format_bytes(p.share_bytes) if p.share_bytes > 0
                     else "none (weights and frames exceed the budget)")
            if p.compiled:
                fx = ("no plan fits" if p.peak_bytes is None
                      else f"{format_bytes(p.peak_bytes)} ({p.sliced_groups} sliced)")
            else:
                fx = f"{format_bytes(p.peak_bytes)} (eager)"
            rows.append([p.name, p.calls, format_bytes(p.other_weight_bytes + p.own_weight_bytes),
                         format_bytes(p.held_bytes) if p.held_bytes else "-",
                         format_bytes(p.eager_activation_bytes), format_bytes(p.eager_peak_bytes), share, fx])
        return tabulate(rows, headers=["phase", "calls", "weights resident", "held", "eager activations",
                                       "eager peak", "fxstream share", "fxstream peak"],
                        tablefmt="github", disable_numparse=True)

    def text(self) -> str:
        head = (f"{self.pipeline}: {self.frames} frames {self.height}x{self.width}, {self.dtype}, decoded "
                f"{self.decode_chunk_size} frames a call, target {self.target}"
                + (", model CPU offload" if self.offload else ""))
        weights = ", ".join(f"{name} {format_bytes(b)}" for name, b in self.components.items())
        lines = [head, f"weights: {weights} (all {format_bytes(self.resident_weight_bytes)})", "", self.table(), ""]
        lines.append(f"whole pipeline peak: eager {format_bytes(self.eager_peak_bytes)}, fxstream "
                     + ("-" if self.peak_bytes is None else format_bytes(self.peak_bytes)) + " (tensors)")
        if self.offload:
            lines.append(f"offload moves {format_bytes(self.offload_bytes)} to the device a generation "
                         f"(~{self.offload_seconds:.1f} s at an assumed {OFFLOAD_BYTES_PER_S / 1e9:g} GB/s)")
        if self.budget_bytes is not None and self.target == "cuda":
            lines.append(f"budget {format_bytes(self.budget_bytes)}: {format_bytes(self.tensor_budget_bytes)} for "
                         f"tensors, {format_bytes(self.budget_bytes - self.tensor_budget_bytes)} allowed for the "
                         f"CUDA context ({format_bytes(CUDA_CONTEXT_BYTES)}) and allocator slack "
                         f"({ALLOCATOR_SLACK:.0%}), assumed figures")
        lines.append(self.fits_line())
        if self.fits is False and not self.offload:
            lines.append("with model CPU offload only the running component's weights are on the device: "
                         "--offload (plan_pipeline(..., offload=True))")
        if self.fits:
            lines.append(f"to run it: fxstream.optimize(pipe, budget_gb={self.optimize_budget_gb:g}"
                         + (", offload=True" if self.offload else "") + ")")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["phases"] = [{**asdict(p), "eager_peak_bytes": p.eager_peak_bytes, "peak_bytes": p.peak_bytes,
                          "least_bytes": p.least_bytes} for p in self.phases]
        out.update(resident_weight_bytes=self.resident_weight_bytes, eager_peak_bytes=self.eager_peak_bytes,
                   peak_bytes=self.peak_bytes, least_bytes=self.least_bytes, allowance_bytes=self.allowance_bytes,
                   fits=self.fits, eager_fits=self.eager_fits, bound=self.bound,
                   optimize_budget_gb=self.optimize_budget_gb, fits_line=self.fits_line())
        return out


# ------------------------------------------------------------------------------------------------- the phases


class _ImageEmbeds(nn.Module):
    """CLIPVisionModelWithProjection as SVD's ``_encode_image`` calls it."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image).image_embeds


class _VaeEncode(nn.Module):
    """The VAE encoding one conditioning image (SVD's ``_encode_vae_image``: the distribution's mode)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mode()


class _T5Embeds(nn.Module):
    """A T5 / UMT5 encoder on one padded prompt with its mask, as WanPipeline's ``_get_t5_prompt_embeds``."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids, mask).last_hidden_state


class _TextEmbeds(nn.Module):
    """A CLIP text encoder on one padded prompt (the pipelines encode the prompt and the negative prompt one
    after the other)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids)[0]


@dataclass
class _Phase:
    name: str
    component: str  # the pipeline component whose weights it runs
    calls: str
    module: nn.Module
    args: tuple
    kwargs: dict
    compiled: bool
    held_bytes: int = 0


def _zoo_inputs(zoo_name: str, module: nn.Module, frames: int, height: int, width: int, dtype: torch.dtype,
                device: torch.device, cfg: bool = True) -> tuple[tuple, dict]:
    """A zoo model's call, as its pipeline makes it, for ``module`` (the pipeline's own component; on the meta
    device, with the released pipelines' prompt lengths)."""
    from fxstream import models

    spec = models.ZOO[zoo_name]
    ctx = models._InputContext(
        module=module, batch=1, cfg_batch=2 if cfg and spec.uses_cfg else 1, frames=frames, height=height,
        width=width, latent_h=height // models.VAE_SCALE_FACTOR, latent_w=width // models.VAE_SCALE_FACTOR,
        dtype=dtype, device=device, rand=models._random_source(0, dtype, device),
        size="full" if device.type == "meta" else "tiny",
    )
    return spec.make_inputs(ctx)


def _phases(pipe: Any, kind: str, frames: int, height: int, width: int, chunk: int, cfg: bool) -> list[_Phase]:
    unet = pipe.transformer if kind in _DIT_KINDS else pipe.unet
    param = next(unet.parameters())
    dtype, device = param.dtype, param.device
    def empty(*shape: int) -> torch.Tensor:  # zeros: allocated nowhere on the meta device
        return torch.zeros(shape, dtype=dtype, device=device)
    batch = "batch 2 for guidance" if cfg else "batch 1"
    out: list[_Phase] = []
    if kind in _DIT_KINDS:
        return _dit_phases(pipe, kind, frames, height, width, cfg, dtype, device)
    if kind == "svd":
        out.append(_Phase("image encoder", "image_encoder", f"1 image {_CLIP_IMAGE}x{_CLIP_IMAGE}",
                          _ImageEmbeds(pipe.image_encoder), (empty(1, 3, _CLIP_IMAGE, _CLIP_IMAGE),), {}, False))
        out.append(_Phase("VAE encode", "vae", f"1 image {height}x{width}", _VaeEncode(pipe.vae),
                          (empty(1, 3, height, width),), {}, False))
        unet_zoo, decoder_zoo = "svd", "svd-vae-decoder"
    else:
        ids = torch.zeros(1, _TEXT_TOKENS, dtype=torch.int64, device=device)
        out.append(_Phase("text encoder", "text_encoder", f"1 prompt of {_TEXT_TOKENS} tokens"
                          + (", twice (and the negative)" if cfg else ""), _TextEmbeds(pipe.text_encoder), (ids,), {},
                          False))
        unet_zoo, decoder_zoo = ("animatediff" if kind == "animatediff" else "modelscope"), "sd-vae-decoder"
    args, kwargs = _zoo_inputs(unet_zoo, unet, frames, height, width, dtype, device, cfg)
    out.append(_Phase("denoiser step", "unet", f"{frames} frames, {batch}", unet, args, kwargs, True))
    args, kwargs = _zoo_inputs(decoder_zoo, pipe.vae.decoder, chunk, height, width, dtype, device)
    frame_bytes = 3 * height * width * dtype.itemsize
    calls = math.ceil(frames / chunk)
    out.append(_Phase("VAE decode", "vae", f"{chunk} frames a call, {calls} call{'s' * (calls > 1)}",
                      pipe.vae.decoder, args, kwargs, True, held_bytes=(frames - chunk) * frame_bytes))
    return out


def _dit_phases(pipe: Any, kind: str, frames: int, height: int, width: int, cfg: bool, dtype: torch.dtype,
                device: torch.device) -> list[_Phase]:
    """The DiT-era pipelines: the T5 / UMT5 prompt (and the negative one), one transformer step as the pipeline
    calls it for guidance, the VAE's whole decode (its own loop over latent frames)."""
    from fxstream.dit_pipelines import TEXT_SEQ_LEN
    from fxstream.models import VaeDecode

    transformer_zoo, decode_zoo, full_tokens, guidance = _DIT_KINDS[kind]
    tokens = full_tokens if device.type == "meta" else TEXT_SEQ_LEN  # the tiny pipelines' prompts
    ids = torch.zeros(1, tokens, dtype=torch.int64, device=device)
    mask = torch.ones(1, tokens, dtype=torch.int64, device=device)
    step = (("batch 1, twice a step for guidance" if guidance == "twice" else "batch 2 for guidance") if cfg
            else "batch 1")
    decode = VaeDecode(pipe.vae)
    args, kwargs = _zoo_inputs(transformer_zoo, pipe.transformer, frames, height, width, dtype, device, cfg)
    d_args, d_kwargs = _zoo_inputs(decode_zoo, decode, frames, height, width, dtype, device)
    return [
        _Phase("text encoder", "text_encoder", f"1 prompt of {tokens} tokens" + (", twice (and the negative)"
                                                                                   if cfg else ""),
               _T5Embeds(pipe.text_encoder), (ids, mask), {}, False),
        _Phase("denoiser step", "transformer", f"{frames} frames, {step}", pipe.transformer, args, kwargs, True),
        _Phase("VAE decode", "vae", f"{frames} frames, 1 call", decode, d_args, d_kwargs, True),
    ]


def plan_pipeline(
    pipe: Any,
    budget_gb: float | None = None,
    *,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    decode_chunk_size: int | None = None,
    dtype: torch.dtype = torch.float16,
    offload: bool = False,
    cfg: bool = True,
    target: str = "cuda",
    progress: Callable[[str], Any] | None = None,
) -> PipelinePlan:
    """Plan one generation of a whole pipeline: every phase eager and with fxstream, and whether it fits.

    Args:
        pipe: a pipeline name (one of :data:`PIPELINE_DEFAULTS`: built at full size on the meta device, in
            ``dtype``) or a diffusers ``StableVideoDiffusionPipeline``, ``AnimateDiffPipeline``,
            ``TextToVideoSDPipeline``, ``WanPipeline``, ``LTXPipeline``, ``CogVideoXPipeline`` or ``MochiPipeline``
            (planned as its modules are: their dtype and device).
        budget_gb: the device's memory in GiB (the card: on CUDA the context and allocator allowance come off
            it, see :func:`tensor_budget_bytes`). None: fxstream's least memory.
        frames, height, width: the video (default: the pipeline's; height and width multiples of 8).
        decode_chunk_size: frames per VAE decode call (default: the pipeline's).
        dtype: for a name only.
        offload: plan with diffusers' model CPU offload (only the running component's weights resident).
        cfg: classifier-free guidance (the denoiser's batch doubled; SVD always guides).
        target: ``"cuda"`` or ``"cpu"``: whose kernels and allowances the plan assumes.
        progress: called with a label as each phase starts (the CLI prints it).

    Raises:
        ValueError: for an unknown pipeline or a bad argument.
    """
    from fxstream import pipelines
    from fxstream.api import _TARGETS, budget_bytes_of
    from fxstream.capture import capture, normalize_inputs
    from fxstream.errors import BudgetError
    from passes.memory import analyze_memory
    from passes.pipeline import PlanRequest
    from passes.pipeline import plan as plan_graph

    started = time.perf_counter()
    budget_bytes = budget_bytes_of(budget_gb)
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    if isinstance(pipe, str):
        if pipe not in PIPELINE_DEFAULTS:
            raise ValueError(f"pipeline: unknown pipeline {pipe!r}; expected one of {', '.join(PIPELINE_DEFAULTS)}")
        name, defaults = pipe, PIPELINE_DEFAULTS[pipe]
        pipe = pipelines.build(name, "full", dtype=dtype)
    else:
        name = type(pipe).__name__
    kind = next((_CLASSES[c.__name__] for c in type(pipe).__mro__ if c.__name__ in _CLASSES), None)
    if kind is None:
        raise ValueError(f"pipeline: plan_pipeline plans {', '.join(_CLASSES)}, not {type(pipe).__name__}")
    if name not in PIPELINE_DEFAULTS:
        defaults = PIPELINE_DEFAULTS[_KIND_DEFAULTS[kind]]
        if kind == "svd":  # the UNet's own frame count
            defaults = (pipe.unet.config.num_frames, *defaults[1:])
    frames = _positive("frames", frames, defaults[0])
    height = _positive("height", height, defaults[1], multiple=8)
    width = _positive("width", width, defaults[2], multiple=8)
    chunk = min(frames, _positive("decode_chunk_size", decode_chunk_size, defaults[3] or frames))
    cfg = True if kind == "svd" else bool(cfg)
    if kind in _DIT_KINDS and decode_chunk_size is not None:
        raise ValueError(f"decode_chunk_size: {type(pipe).__name__} decodes every frame in one call (its VAE "
                         "loops itself)")

    weights = {n: sum(pipelines._storages(m).values()) for n, m in pipe.components.items() if isinstance(m, nn.Module)}
    storages = pipelines._storages(*[m for m in pipe.components.values() if isinstance(m, nn.Module)])
    tensors = None if budget_bytes is None else tensor_budget_bytes(budget_bytes, target)
    denoiser = pipe.transformer if kind in _DIT_KINDS else pipe.unet
    dtype_name = str(next(denoiser.parameters()).dtype).removeprefix("torch.")
    result = PipelinePlan(name, frames, height, width, dtype_name, chunk, target, bool(offload), budget_bytes,
                          tensors, weights)
    previous = None
    for phase in _phases(pipe, kind, frames, height, width, chunk, cfg):
        t0 = time.perf_counter()
        if progress is not None:
            progress(f"{phase.name} ({phase.calls})")
        own = pipelines._storages(phase.module)
        own_bytes = sum(own.values())
        # offload: every component but the running one is away (the rest of it, the VAE's encoder, comes along)
        away = storages.keys() - pipelines._storages(pipe.components[phase.component]).keys() if offload else set()
        other = pipelines.other_weight_bytes(storages, own, away)
        if offload and phase.component != previous:
            result.offload_bytes += weights[phase.component]
        previous = phase.component
        flat, extra = normalize_inputs(phase.module, phase.args, phase.kwargs)
        gm = capture(phase.module, *flat, **extra)
        eager = analyze_memory(gm, lifetime="eager", target=target)
        share = None if tensors is None else tensors - other - phase.held_bytes
        record = PhasePlan(phase.name, phase.component, phase.calls, phase.compiled, own_bytes, other,
                           phase.held_bytes, eager.activation_peak_bytes, None,
                           share_bytes=share if phase.compiled else None)
        if phase.compiled:
            request = PlanRequest(budget_bytes=None if share is None else max(share, 1), target=target)
            try:
                decided = plan_graph(gm, request).plan
            except BudgetError as e:
                record.floor_activation_bytes = e.min_peak_bytes - eager.weight_bytes
            else:
                record.planned_activation_bytes = decided.predicted_activation_peak_bytes
                record.sliced_groups = len(decided.sliced_groups)
                if share is None:
                    record.floor_activation_bytes = decided.predicted_activation_peak_bytes
        del gm
        record.seconds = time.perf_counter() - t0
        result.phases.append(record)
    result.seconds = time.perf_counter() - started
    return result


def _positive(arg: str, value: Any, default: int, multiple: int = 1) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{arg}: expected a positive integer, got {value!r}")
    if value % multiple:
        raise ValueError(f"{arg}: must be divisible by {multiple} (the VAE's factor), got {value}")
    return value
