"""Tiny trained reference models: real denoisers, small enough for a CPU, shipped with the package.

Random weights do not behave like a trained denoiser (their features do not change smoothly from one
denoising step to the next), so measuring Step Rehash's fidelity needs trained models. Real weights cannot be
downloaded in CI, so fxstream ships two tiny ones, trained on procedurally generated clips of moving shapes
by ``scripts/train_reference.py`` (the command that made each file is stored in its metadata and in
``fxstream/weights/README.md``):

* ``"svd"``: a ``UNetSpatioTemporalConditionModel`` (SVD's architecture, 2 levels) conditioned on the first
  frame, like image-to-video SVD: the conditioning frame is concatenated to the noisy latents along channels
  and a small learned image projection stands in for the CLIP image embedding. EDM / v-prediction
  parameterisation, sampled with SVD's own ``EulerDiscreteScheduler`` settings (Karras sigmas) and SVD's
  frame-wise guidance ramp (1.0 to 3.0).
* ``"animatediff"``: a ``UNetMotionModel`` (SD-1.5 blocks + motion modules, 2 levels) conditioned on a class
  "prompt" (the direction the shapes move in), sampled with DDIM (v-prediction) and classifier-free
  guidance.

Both generate 8 frames of 16x16 "latents" with 4 channels; the first three channels are shown as RGB.

    ref = fxstream.reference.load("svd")
    video = ref.sample(steps=25, seed=0)          # (1, 8, 4, 16, 16)
    video = ref.sample(unet=fxstream.compile(ref.unet, rehash=...))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxstream import models as _models

NAMES = ("svd", "animatediff")
FRAMES = 8
SIZE = 16  # latent height and width
CHANNELS = 4
WEIGHTS_DIR = Path(__file__).parent / "weights"

# The architectures: the zoo's tiny svd and animatediff configs (fxstream.models), svd with 8 frames. The
# shipped weights were trained with exactly these; loading is strict, so a change to the zoo's tiny configs
# fails loudly in ``load`` rather than silently building another architecture.
SVD_CONFIG: dict[str, Any] = {**_models.SVD_UNET_TINY, "num_frames": FRAMES}
ANIMATEDIFF_CONFIG: dict[str, Any] = {k: dict(v) for k, v in _models.ANIMATEDIFF_TINY.items()}

# SVD's scheduler (stabilityai/stable-video-diffusion-img2vid scheduler_config.json) and pipeline constants.
SVD_SCHEDULER = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
    steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
)
SVD_ADDED_TIME_IDS = (6.0, 127.0, 0.02)  # fps - 1, motion bucket, noise augmentation
SVD_NOISE_AUG = 0.02
SVD_GUIDANCE = (1.0, 3.0)  # min, max: ramped over frames like StableVideoDiffusionPipeline
# AnimateDiff-style: SD-1.5's training betas, v-prediction, DDIM sampling from the last timestep.
DDPM_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
ANIMATEDIFF_SCHEDULER = dict(**DDPM_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             prediction_type="v_prediction", timestep_spacing="trailing")
ANIMATEDIFF_GUIDANCE = 3.0
CLASSES = ("right", "left", "down", "up")  # the animatediff model's "prompts": the direction of motion
PROMPT_TOKENS = 4  # length of a class "prompt embedding"


# ------------------------------------------------------------------------------------------------------------
# Data: clips of soft-edged shapes moving at constant speed over a plain background.


def make_clips(
    batch: int,
    *,
    generator: torch.Generator,
    frames: int = FRAMES,
    size: int = SIZE,
    classes: torch.Tensor | None = None,
    scale: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` clips (batch, frames, 4, size, size) in [-1, 1] and their motion class (batch,).

    Each clip has a background colour and one or two discs or squares (radius 2-4 px) of bright colours
    moving in a straight line; the class is the direction of the first shape (see :data:`CLASSES`), drawn at
    random unless ``classes`` is given. Channels are RGB plus a fourth colour channel. ``scale``: the same
    clips (the same draws from ``generator``) rendered at ``size * scale`` pixels, edges as sharp as at
    ``size`` (what :data:`DECODER_SCALE` decodes latents to).
    """
    g = generator
    if classes is None:
        classes = torch.randint(len(CLASSES), (batch,), generator=g)
    directions = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # (dx, dy) per class
    pixels = size * scale
    # pixel centres in the units of a size-pixel clip
    grid = (torch.arange(pixels, dtype=torch.float32) + 0.5) / scale - 0.5 if scale != 1 else \
        torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    t = torch.arange(frames, dtype=torch.float32)
    video = (torch.rand(batch, 1, CHANNELS, 1, 1, generator=g) * 0.6 - 0.9).expand(
        batch, frames, CHANNELS, pixels, pixels).clone()
    n_shapes = torch.randint(1, 3, (batch,), generator=g)
    for b in range(batch):
        for s in range(int(n_shapes[b])):
            radius = 2.0 + 2.0 * float(torch.rand((), generator=g))
            speed = 0.8 + 0.7 * float(torch.rand((), generator=g))
            if s == 0:
                direction = directions[int(classes[b])]
            else:
                angle = 2 * math.pi * float(torch.rand((), generator=g))
                direction = torch.tensor([math.cos(angle), math.sin(angle)])
            travel = speed * (frames - 1)
            # start so that the shape stays mostly in view along its path
            lo = radius - 1 + torch.clamp(-direction * travel, min=0)
            hi = size - radius + 1 - torch.clamp(direction * travel, min=0)
            start = lo + (hi - lo).clamp(min=0) * torch.rand(2, generator=g)
            color = torch.rand(CHANNELS, generator=g) * 1.4 - 0.4
            square = bool(torch.rand((), generator=g) < 0.5)
            cx = start[0] + direction[0] * speed * t  # (frames,)
            cy = start[1] + direction[1] * speed * t
            dx = xx[None] - cx[:, None, None]
            dy = yy[None] - cy[:, None, None]
            dist = torch.maximum(dx.abs(), dy.abs()) if square else torch.sqrt(dx * dx + dy * dy)
            # (frames, pixels, pixels), anti-aliased over one pixel of the rendering
            alpha = ((radius + 0.5 - dist) if scale == 1 else ((radius - dist) * scale + 0.5)).clamp(0, 1)
            video[b] = video[b] * (1 - alpha[:, None]) + color[None, :, None, None] * alpha[:, None]
    return video.clamp(-1, 1), classes


# ------------------------------------------------------------------------------------------------------------
# Models


class SVDConditioner(nn.Module):
    """Stands in for SVD's CLIP image encoder: a learned projection of the 4x4-pooled conditioning frame."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.image_proj = nn.Linear(CHANNELS * 16, dim)

    def forward(self, frame: torch.Tensor) -> torch.Tensor:  # (B, 4, H, W) -> (B, 1, dim)
        pooled = torch.nn.functional.adaptive_avg_pool2d(frame, 4).flatten(1)
        return self.image_proj(pooled)[:, None]


class ClassPrompts(nn.Module):
    """AnimateDiff's text encoder stand-in: one learned prompt embedding per class, plus the empty prompt."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.table = nn.Parameter(torch.randn(len(CLASSES) + 1, PROMPT_TOKENS, dim) * 0.5)

    def forward(self, classes: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, tokens, dim); -1 = empty prompt
        return self.table[torch.where(classes < 0, len(CLASSES), classes)]


def build_unet(name: str, seed: int = 0) -> nn.Module:
    """The untrained architecture of reference model ``name``."""
    _check_name(name)
    from fxstream.models import _quiet_diffusers

    torch.manual_seed(seed)
    with _quiet_diffusers():
        if name == "svd":
            from diffusers import UNetSpatioTemporalConditionModel

            return UNetSpatioTemporalConditionModel(**SVD_CONFIG)
        from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

        unet = UNet2DConditionModel(**ANIMATEDIFF_CONFIG["unet"])
        adapter = MotionAdapter(**ANIMATEDIFF_CONFIG["motion_adapter"])
        return UNetMotionModel.from_unet2d(unet, adapter)


def build_conditioner(name: str) -> nn.Module:
    _check_name(name)
    return SVDConditioner() if name == "svd" else ClassPrompts()


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown reference model {name!r}; choose one of {', '.join(NAMES)}")


@dataclass
class ReferenceModel:
    """A trained reference model: its UNet, its conditioner, and a sampler that calls the UNet like the
    diffusers pipeline of its family does (classifier-free guidance batch of 2, one call per step)."""

    name: str
    unet: nn.Module
    conditioner: nn.Module
    metadata: dict[str, str] = field(default_factory=dict)

    def condition(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A conditioning clip drawn from the training distribution: (clip (1, F, 4, H, W), class (1,))."""
        clip, cls = make_clips(1, generator=torch.Generator().manual_seed(10_000 + seed))
        return clip, cls

    @torch.no_grad()
    def sample(
        self,
        *,
        steps: int = 25,
        seed: int = 0,
        unet: Callable[..., Any] | None = None,
        clip: torch.Tensor | None = None,
        classes: torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate one video (1, F, 4, H, W) with ``steps`` denoising steps; ``unet`` replaces the model's
        UNet (e.g. a compiled one). The conditioning (first frame for svd, class for animatediff) comes from
        ``clip`` / ``classes`` or from :meth:`condition` (``seed``)."""
        unet = unet if unet is not None else self.unet
        if clip is None or classes is None:
            c_clip, c_cls = self.condition(seed)
            clip = c_clip if clip is None else clip
            classes = c_cls if classes is None else classes
        noise = torch.randn(1, FRAMES, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        steps_iter: Iterable[int] = range(steps)
        if progress:
            from tqdm.auto import tqdm

            steps_iter = tqdm(steps_iter, desc=f"{self.name} sampling", leave=False)
        if self.name == "svd":
            return _sample_svd(unet, self.conditioner, clip[:, 0], noise, steps_iter, steps)
        return _sample_animatediff(unet, self.conditioner, classes, noise, steps_iter, steps)


def svd_unet_inputs(conditioner: nn.Module, frame: torch.Tensor, batch_frames: int = FRAMES):
    """The parts of SVD's UNet call that do not change over steps, for the guidance batch [uncond, cond]."""
    frame = frame + SVD_NOISE_AUG * torch.randn(frame.shape, generator=torch.Generator().manual_seed(1))
    emb = conditioner(frame)
    embeddings = torch.cat([torch.zeros_like(emb), emb])
    cond = frame[:, None].expand(-1, batch_frames, -1, -1, -1)
    cond = torch.cat([torch.zeros_like(cond), cond])
    ids = torch.tensor([SVD_ADDED_TIME_IDS] * 2, dtype=frame.dtype)
    return cond, embeddings, ids


def _sample_svd(unet, conditioner, frame, noise, steps_iter, steps):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    scheduler.set_timesteps(steps)
    cond, embeddings, ids = svd_unet_inputs(conditioner, frame)
    guidance = torch.linspace(*SVD_GUIDANCE, FRAMES)[None, :, None, None, None]
    latents = noise * scheduler.init_noise_sigma
    for i in steps_iter:
        t = scheduler.timesteps[i]
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        x = torch.cat([x, cond], dim=2)
        out = unet(x, t, encoder_hidden_states=embeddings, added_time_ids=ids, return_dict=False)[0]
        uncond, text = out.chunk(2)
        out = uncond + guidance * (text - uncond)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


def _sample_animatediff(unet, conditioner, classes, noise, steps_iter, steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**ANIMATEDIFF_SCHEDULER)
    scheduler.set_timesteps(steps)
    prompts = conditioner(torch.cat([torch.full_like(classes, -1), classes]))  # (2, tokens, dim)
    prompts = prompts.repeat_interleave(FRAMES, dim=0)  # AnimateDiffPipeline repeats prompts per frame
    latents = noise.permute(0, 2, 1, 3, 4) * scheduler.init_noise_sigma  # (B, C, F, H, W)
    for i in steps_iter:
        t = scheduler.timesteps[i]
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        out = unet(x, t, encoder_hidden_states=prompts, return_dict=False)[0]
        uncond, text = out.chunk(2)
        out = uncond + ANIMATEDIFF_GUIDANCE * (text - uncond)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents.permute(0, 2, 1, 3, 4)


# ------------------------------------------------------------------------------------------------------------
# Files


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def save(path: str | Path, name: str, unet: nn.Module, conditioner: nn.Module, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v.detach().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"conditioner.{k}": v.detach().contiguous() for k, v in conditioner.state_dict().items()})
    save_file(tensors, str(path), metadata={"name": name, **metadata})


def load(name: str, path: str | Path | None = None) -> ReferenceModel:
    """Load the shipped trained reference model ``name`` (``"svd"`` or ``"animatediff"``), fp32, CPU, eval."""
    from safetensors import safe_open

    _check_name(name)
    path = Path(path) if path is not None else weights_path(name)
    if not path.exists():
        raise FileNotFoundError(f"no weights for reference model {name!r} at {path}")
    unet = build_unet(name)
    conditioner = build_conditioner(name)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    conditioner.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("conditioner.")})
    for m in (unet, conditioner):
        m.eval().requires_grad_(False)
    return ReferenceModel(name, unet, conditioner, metadata)


# ------------------------------------------------------------------------------------------------------------
# The decoder: the reference models' 16x16 "latents" to 128x128 RGB frames, trained on the same clips rendered at
# both sizes (make_clips(scale=DECODER_SCALE)), so a sample becomes a video a person can watch.

DECODER_NAME = "decoder"
DECODER_SCALE = 8
# The zoo's medium SD-1.5 VAE decoder architecture (fxstream.models.SD_VAE_DECODER_MEDIUM): 4 latent channels
# to RGB, 3 upsamplers (x8).
DECODER_CONFIG: dict[str, Any] = dict(_models.SD_VAE_DECODER_MEDIUM)


class ReferenceDecoder(nn.Module):
    """(N, 4, 16, 16) latents in [-1, 1] -> (N, 3, 128, 128) RGB in [-1, 1]: the latent's RGB channels upsampled
    (nearest, x8) plus what diffusers' VAE ``Decoder`` adds to them (edges, the shapes' outlines). The skip
    carries the colours: the decoder's GroupNorms remove each channel's mean, a flat background's colour."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder

        with _models._quiet_diffusers():
            self.decoder = Decoder(**DECODER_CONFIG)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        skip = torch.nn.functional.interpolate(z[:, :3], scale_factor=DECODER_SCALE, mode="nearest")
        return skip + self.decoder(z)


def build_decoder(seed: int = 0) -> nn.Module:
    """The untrained :class:`ReferenceDecoder`."""
    torch.manual_seed(seed)
    return ReferenceDecoder()


def save_decoder(path: str | Path, decoder: nn.Module, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in decoder.state_dict().items()}
    save_file(tensors, str(path), metadata={"name": DECODER_NAME, **metadata})


def load_decoder(path: str | Path | None = None) -> nn.Module:
    """The shipped trained decoder, fp32, CPU, eval; ``decoder(latents.flatten(0, 1))`` decodes a sample's
    frames (see :func:`decode`)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else weights_path(DECODER_NAME)
    if not path.exists():
        raise FileNotFoundError(f"no weights for the reference decoder at {path}")
    decoder = build_decoder()
    decoder.load_state_dict(load_file(str(path)))
    return decoder.eval().requires_grad_(False)


@torch.no_grad()
def decode(video: torch.Tensor, decoder: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A sample (B, F, 4, 16, 16) -> uint8 frames (B, F, 128, 128, 3), through ``decoder`` (the module from
    :func:`load_decoder`, or a compiled one)."""
    b, f = video.shape[:2]
    rgb = decoder(video.flatten(0, 1).clamp(-1, 1))
    rgb = rgb.reshape(b, f, *rgb.shape[1:])
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1)


def to_rgb(video: torch.Tensor) -> torch.Tensor:
    """(..., 4, H, W) in [-1, 1] -> uint8 (..., H, W, 3) from the first three channels."""
    rgb = ((video[..., :3, :, :].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rgb.movedim(-3, -1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of ``a`` against ``b`` for values in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((a.double().clamp(-1, 1) - b.double().clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)
