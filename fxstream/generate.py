"""``fxstream generate``: run a whole diffusers video pipeline under fxstream and write the video.

    fxstream generate --out demo.gif                     # the built-in demo: offline, seconds, on the CPU
    fxstream generate --prompt "moving up" --out up.gif  # ... its shapes moving up (right, left, down, up)
    fxstream generate --model ./svd-xt --image cat.png --frames 25 --budget-gb 12 --out cat.mp4
    fxstream generate --model ./animatediff --prompt "a fox in the snow" --steps 25 --out fox.gif

With no ``--model``: the built-in demo, fxstream's own tiny trained models (no download): the reference
AnimateDiff-architecture UNet (:mod:`fxstream.reference`) denoises 8 frames of 16x16 latents in which shapes move
in the direction the prompt names, and the reference decoder turns them into 128x128 RGB frames; both compiled
with :func:`fxstream.compile` under the budget, on the CPU.

The pipeline is loaded with ``DiffusionPipeline.from_pretrained`` (a local folder works offline; a Hub id is
fetched by diffusers), its UNet and VAE decoder compiled with :func:`fxstream.optimize` for the budget, and
called once. Printed afterwards: the measured peak memory (weights + activations; on CPU counted by
:func:`fxstream.measure`, on CUDA read from ``torch.cuda.max_memory_allocated``) and the time, compiling
included. ``--eager`` runs the pipeline as diffusers does, for comparison.

Videos: ``.mp4`` through ffmpeg (``pip install imageio-ffmpeg``); without ffmpeg a ``.gif`` is written beside
it instead, and said so. ``.gif`` needs only Pillow.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import inspect
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

from fxstream.cli import DTYPES, MIN_BUDGET, UsageError, _budget, _positive_int, progress

# Pipelines generate runs, with the input each needs and the frame rate its videos are written at (SVD: the
# pipeline's own ``fps`` conditioning default; the others: diffusers' examples).
_IMAGE_PIPELINES = {"StableVideoDiffusionPipeline": 7}
_TEXT_PIPELINES = {"AnimateDiffPipeline": 8, "TextToVideoSDPipeline": 8}
_OUTPUTS = (".mp4", ".gif")
_GENERATE_DTYPES = ("fp16", "fp32")
# "org/name" as the Hugging Face Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
AUTO_BUDGET = "auto"  # fxstream.pipelines.AUTO_BUDGET, without importing torch


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    """Register the ``generate`` subcommand on the ``fxstream`` parser's subcommands."""
    gen = commands.add_parser(
        "generate",
        help="run a diffusers video pipeline under fxstream and write the video",
        description="Load a StableVideoDiffusion (--image), AnimateDiff or TextToVideoSD (--prompt) "
        "pipeline, compile its UNet and VAE decoder for the memory budget, generate one video and write it; "
        "print the measured peak memory and the time.",
    )
    gen.add_argument("--model", metavar="PATH_OR_HUB_ID",
                     help="a pipeline folder (save_pretrained / a Hub snapshot) or a Hugging Face Hub id "
                     "(default: the built-in demo, fxstream's tiny trained models: 8 frames 128x128 of moving "
                     "shapes, offline, on the CPU)")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--image", metavar="IN.png", help="conditioning image (Stable Video Diffusion)")
    source.add_argument("--prompt", metavar="TEXT", help="text prompt (AnimateDiff, TextToVideoSD; the demo: "
                        f"the direction its shapes move, one of {', '.join(DEMO_DIRECTIONS)})")
    gen.add_argument("--frames", type=_positive_int, metavar="N", help="frames (default: the pipeline's)")
    gen.add_argument("--height", type=_positive_int, metavar="H", help="pixels (default: the pipeline's)")
    gen.add_argument("--width", type=_positive_int, metavar="W", help="pixels (default: the pipeline's)")
    gen.add_argument("--steps", type=_positive_int, metavar="S",
                     help="denoising steps (default: the pipeline's)")
    gen.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default: %(default)s)")
    gen.add_argument("--decode-chunk-size", type=_positive_int, metavar="N",
                     help="frames the VAE decodes at once (SVD, AnimateDiff; default: the pipeline's)")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--budget-gb", type=functools.partial(_budget, words=(AUTO_BUDGET, MIN_BUDGET)),
                      default=AUTO_BUDGET, metavar="GIB|auto|min",
                      help="whole-pipeline memory budget: all weights + the running component's activations; "
                      "'auto' (default): what fits the device now, slicing only what must be (fastest); 'min': "
                      "as little memory as slicing can reach (slowest)")
    mode.add_argument("--eager", action="store_true", help="run the pipeline unmodified, for comparison")
    gen.add_argument("--rehash", default="off", metavar="auto|off|CONFIG.json",
                     help="Step Rehash for the UNet: 'auto' caches the decoder's last temporal layer and runs "
                     "every other step in full; a RehashConfig JSON from fxstream.calibrate uses its cache "
                     "point and schedule; 'off' (default) runs every step in full, exactly")
    gen.add_argument("--dtype", choices=_GENERATE_DTYPES,
                     help="weights and activations (default: fp16 on cuda, fp32 on cpu)")
    gen.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available, else cpu")
    gen.add_argument("--out", required=True, metavar="OUT.mp4|OUT.gif", help="the video to write")
    gen.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace, argv: list[str]) -> int:
    # Cheap checks first: nothing is loaded until the arguments are known to be usable.
    out = _check_output(args.out)
    if args.model is None:
        return run_demo(args, out)
    if args.image is None and args.prompt is None:
        raise UsageError("one of the arguments --image --prompt is required with --model")
    image = _read_image(args.image) if args.image is not None else None
    local = _check_model(args.model)
    rehash = _check_rehash(args.rehash, args.eager)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda is not available on this machine")
    dtype_name = args.dtype or ("fp16" if device == "cuda" else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])

    with progress(f"loading {args.model} ({dtype_name}, {device})"), _quiet_libraries():
        pipe = _load(args.model, local, dtype).to(device)
    kind = type(pipe).__name__
    call = _call_arguments(pipe, args, image, device)

    optimization = None
    if not args.eager:
        import fxstream

        optimization = fxstream.optimize(pipe, args.budget_gb, rehash=rehash)
    from passes.memory import format_bytes

    budget = ("eager (no fxstream)" if optimization is None else "minimum memory"
              if optimization.budget_bytes is None else f"budget {format_bytes(optimization.budget_bytes)}"
              + (" (auto)" if args.budget_gb == AUTO_BUDGET else ""))
    print(f"{kind}: {call['num_frames']} frames {call['height']}x{call['width']}, "
          f"{call['num_inference_steps']} steps, {dtype_name} on {device}, {budget}", file=sys.stderr)
    if optimization is not None:
        print("compiling the UNet and the VAE decoder on their first calls", file=sys.stderr)

    output, activations, weights, seconds = _run_measured(pipe, call, device)
    frames = _to_uint8(output)
    del output

    written = _video_path(out)
    with progress(f"writing {written}"):
        _write_video(written, frames, _fps(kind))

    compile_seconds = optimization.compile_seconds if optimization is not None else 0.0
    if optimization is not None:
        print(optimization.report())
    how = ("torch.cuda.max_memory_allocated" if device == "cuda"
           else "fxstream.measure: live tensor storage, weights resident")
    _print_measured(weights, activations, how, seconds, compile_seconds if optimization is not None else None)
    controller = optimization.rehash if optimization is not None else None
    if controller is not None:
        full = controller.full_steps_run
        total = len(controller.history)
        decision = optimization.component("unet").module.plan.rehash
        print(f"rehash: {len(full)} of {total} steps full (steps {', '.join(map(str, full))}); cache point "
              f"{decision.cache_point}, {decision.skipped_fraction:.0%} of the UNet's FLOPs skipped on the "
              "other steps")
    note = "" if written == out else f" (no ffmpeg for {out}: pip install imageio-ffmpeg)"
    print(f"wrote {written}: {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]}{note}")
    return 0


# ------------------------------------------------------------------------------------------------- arguments


# ---------------------------------------------------------------------------------------------- the demo

DEMO_DIRECTIONS = ("right", "left", "down", "up")  # fxstream.reference.CLASSES, without importing torch
DEMO_FPS = 8


def _demo_direction(prompt: str | None) -> str:
    if prompt is None:
        return DEMO_DIRECTIONS[0]
    words = re.findall(r"[a-z]+", prompt.lower())
    for word in words:
        if word in DEMO_DIRECTIONS:
            return word
    raise UsageError(f"argument --prompt: the built-in demo's prompt names the direction its shapes move, one of "
                     f"{', '.join(DEMO_DIRECTIONS)}; got {prompt!r} (pass --model for a text-to-video pipeline)")


def run_demo(args: argparse.Namespace, out: str) -> int:
    """The built-in demo: the reference AnimateDiff UNet and the reference decoder, compiled, on the CPU."""
    if args.image is not None:
        raise UsageError("argument --image: the built-in demo takes --prompt (a direction); pass --model for "
                         "Stable Video Diffusion")
    for option, value in (("--frames", args.frames), ("--height", args.height), ("--width", args.width),
                          ("--decode-chunk-size", args.decode_chunk_size), ("--dtype", args.dtype),
                          ("--device", args.device if args.device != "cpu" else None)):
        if value is not None:
            raise UsageError(f"argument {option}: the built-in demo is 8 frames 128x128, fp32, on the CPU; "
                             "pass --model for a pipeline of your own")
    direction = _demo_direction(args.prompt)
    rehash = _check_rehash(args.rehash, args.eager)
    steps = args.steps or 25

    import torch

    import fxstream
    from fxstream import reference
    from fxstream.pipelines import _storages, other_weight_bytes
    from passes.memory import format_bytes

    with progress("loading the built-in demo (fxstream's trained reference UNet and decoder)"):
        model = reference.load("animatediff")
        decoder = reference.load_decoder()
    resident = _storages(model.unet, model.conditioner, decoder)
    weights = sum(resident.values())
    unet, decode = model.unet, decoder
    if args.eager:
        budget = "eager (no fxstream)"
    else:
        budget_bytes = _demo_budget(args.budget_gb, weights)
        budget = "minimum memory" if budget_bytes is None else f"budget {format_bytes(budget_bytes)}" + (
            " (auto)" if args.budget_gb == AUTO_BUDGET else "")

        def share(module: Any) -> float | None:  # the budget less the other components' weights, as optimize
            return (None if budget_bytes is None
                    else (budget_bytes - other_weight_bytes(resident, _storages(module))) / 2**30)

        unet = fxstream.compile(model.unet, budget_gb=share(model.unet), rehash=rehash)
        decode = fxstream.compile(decoder, budget_gb=share(decoder))
    print(f"built-in demo: shapes moving {direction}, 8 frames 128x128, {steps} steps, fp32 on cpu, {budget}",
          file=sys.stderr)
    classes = torch.tensor([reference.CLASSES.index(direction)])

    def run() -> Any:
        video = model.sample(steps=steps, seed=args.seed, unet=unet, classes=classes, progress=True)
        return reference.decode(video, decode)[0]

    from fxstream.measure import measure

    with _compile_outside_measurement():
        m = measure(run)
    frames = m.output.numpy()
    written = _video_path(out)
    with progress(f"writing {written}"):
        _write_video(written, frames, DEMO_FPS)
    compile_seconds = 0.0
    if not args.eager:
        compile_seconds = sum(e.compile_seconds for c in (unet, decode) for e in c._fx_cache.values())
        for name, c in (("unet", unet), ("decoder", decode)):
            print(f"{name}: {len(c.plan.sliced_groups)} sliced groups, predicted peak "
                  f"{format_bytes(c.plan.predicted_peak_bytes)} (eager {format_bytes(c.plan.baseline_peak_bytes)})")
    _print_measured(weights, m.activation_peak_bytes, "fxstream.measure: live tensor storage", m.seconds,
                    None if args.eager else compile_seconds)
    print(f"wrote {written}: {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]}")
    return 0


def _print_measured(weights: int, activations: int, how: str, seconds: float, compile_seconds: float | None) -> None:
    """The measured peak memory and time of a generation (``compile_seconds`` None: nothing compiled)."""
    from passes.memory import format_bytes

    print(f"peak memory: {format_bytes(weights + activations)} (weights {format_bytes(weights)} + "
          f"activations {format_bytes(activations)}; {how})")
    compiling = ("" if compile_seconds is None
                 else f" (compiling {compile_seconds:.1f} s, generating {seconds - compile_seconds:.1f} s)")
    print(f"time: {seconds:.1f} s{compiling}")


def _demo_budget(budget_gb: Any, weights: int) -> int | None:
    if budget_gb == AUTO_BUDGET:
        from fxstream.pipeline_plan import auto_budget_bytes

        return auto_budget_bytes("cpu", weights)
    if budget_gb == MIN_BUDGET:
        return None
    budget = int(budget_gb * 2**30)
    if budget <= weights:
        raise UsageError(f"argument --budget-gb: {budget_gb:g} GiB does not cover the demo's weights "
                         f"({weights / 2**20:.1f} MiB)")
    return budget


def _check_rehash(value: str, eager: bool) -> Any:
    if value == "off":
        return None
    if eager:
        raise UsageError("argument --rehash: not with --eager (the eager pipeline runs every step in full)")
    if value == "auto":
        return "auto"
    if not value.endswith(".json"):
        raise UsageError(f"argument --rehash: expected auto, off or a .json file, got {value!r}")
    if not os.path.isfile(value):
        raise UsageError(f"argument --rehash: no such file {value!r}")
    from fxstream.runtime.rehash import RehashConfig

    try:
        return RehashConfig.load(value)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"argument --rehash: {value} is not a RehashConfig or Plan JSON ({e})") from e


def _check_output(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _OUTPUTS:
        raise UsageError(f"argument --out: expected a .mp4 or .gif file, got {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"argument --out: cannot write {path!r}")
    return path


def _read_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UsageError(f"argument --image: cannot read image {path!r}: {reason}") from None


def _check_model(model: str) -> bool:
    """True for a local pipeline folder; False for a Hub id; a UsageError for anything else."""
    if os.path.isdir(model):
        index = os.path.join(model, "model_index.json")
        if not os.path.isfile(index):
            raise UsageError(
                f"argument --model: {model!r} is not a diffusers pipeline folder (no model_index.json)")
        try:
            with open(index) as f:
                kind = json.load(f).get("_class_name")
        except (OSError, ValueError) as e:
            raise UsageError(f"argument --model: cannot read {index!r}: {e}") from None
        _check_kind(kind)
        return True
    if os.path.exists(model):
        raise UsageError(f"argument --model: {model!r} is a file, not a diffusers pipeline folder")
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise UsageError(f"argument --model: no such pipeline folder {model!r}")
    return False


def _check_kind(kind: str | None) -> None:
    supported = (*_IMAGE_PIPELINES, *_TEXT_PIPELINES)
    if kind not in supported:
        raise UsageError(f"argument --model: {kind or 'this model'} is not supported; supported pipelines: "
                         f"{', '.join(supported)}")


def _load(model: str, local: bool, dtype: Any) -> Any:
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():
            # diffusers >= 0.40 renames the argument to ``dtype`` and warns; older versions take only this one
            warnings.filterwarnings("ignore", ".*torch_dtype.*", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "from the folder" if local else "(no such local folder; from the Hugging Face Hub)"
        raise UsageError(f"argument --model: cannot load {model!r} {where}: {first}") from None
    _check_kind(type(pipe).__name__)
    pipe.set_progress_bar_config(file=sys.stderr)
    return pipe


def _call_arguments(pipe: Any, args: argparse.Namespace, image: Any, device: str) -> dict:
    """Keyword arguments of ``pipe(...)``; sizes the model cannot take are a UsageError."""
    import torch

    kind = type(pipe).__name__
    if kind in _IMAGE_PIPELINES and image is None:
        raise UsageError(f"{kind} makes a video from an image: pass --image, not --prompt")
    if kind in _TEXT_PIPELINES and image is not None:
        raise UsageError(f"{kind} makes a video from text: pass --prompt, not --image")

    defaults = {name: p.default for name, p in inspect.signature(pipe.__call__).parameters.items()}
    unet = pipe.unet.config
    sample = getattr(unet, "sample_size", None) or 64
    height = args.height or defaults.get("height") or sample * pipe.vae_scale_factor
    width = args.width or defaults.get("width") or sample * pipe.vae_scale_factor
    frames = args.frames or defaults.get("num_frames") or getattr(unet, "num_frames", None) or 16
    steps = args.steps or defaults["num_inference_steps"]

    # Pixels -> latents (the VAE's factor), then halved by each of the UNet's downsamplers.
    factor = pipe.vae_scale_factor * 2 ** (len(unet.down_block_types) - 1)
    for name, value in (("height", height), ("width", width)):
        if value % factor:
            raise UsageError(f"argument --{name}: {kind} needs a multiple of {factor} pixels (VAE factor "
                             f"{pipe.vae_scale_factor} x {len(unet.down_block_types) - 1} UNet "
                             f"downsamplers), got {value}")
    max_frames = getattr(unet, "motion_max_seq_length", None)
    if max_frames is not None and frames > max_frames:
        raise UsageError(
            f"argument --frames: this motion adapter takes at most {max_frames} frames, got {frames}")
    if args.decode_chunk_size is not None and "decode_chunk_size" not in defaults:
        raise UsageError(f"argument --decode-chunk-size: {kind} decodes all frames at once")

    call = dict(num_frames=frames, height=height, width=width, num_inference_steps=steps, output_type="np",
                generator=torch.Generator(device=device).manual_seed(args.seed))
    if image is not None:
        call["image"] = image
    else:
        call["prompt"] = args.prompt
    if args.decode_chunk_size is not None:
        call["decode_chunk_size"] = args.decode_chunk_size
    return call


# ------------------------------------------------------------------------------------------------- running


def _run_measured(pipe: Any, call: dict, device: str) -> tuple[Any, int, int, float]:
    """Run ``pipe(**call)``; returns (its frames, activation peak bytes, weight bytes, seconds)."""
    import torch

    from fxstream.pipelines import _pipeline_modules, _storages

    weights = sum(_storages(*_pipeline_modules(pipe)).values())
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.no_grad():
            output = pipe(**call).frames
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        # Everything allocated on the device at the peak, less what was there before (the weights).
        activations = torch.cuda.max_memory_allocated() - before
        weights = before
        return output, activations, weights, seconds

    from fxstream.measure import measure

    with _compile_outside_measurement():
        m = measure(lambda: pipe(**call).frames)
    return m.output, m.activation_peak_bytes, weights, m.seconds


@contextlib.contextmanager
def _compile_outside_measurement() -> Iterator[None]:
    """Run fxstream's capture and planning with the measuring dispatch mode switched off.

    A compiled component compiles on its first call, inside the measured pipeline call. ``torch.export``'s
    fake tensors would otherwise be counted as live storage (a tiny VAE decoder's first call measures 20x its
    activations), and the graph must be the same whether or not it is measured.
    """
    from torch.utils._python_dispatch import _disable_current_modes

    from fxstream import module as streamlined

    build_plan = streamlined.build_plan

    @functools.wraps(build_plan)
    def unmeasured(*args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():
            return build_plan(*args, **kwargs)

    streamlined.build_plan = unmeasured
    try:
        yield
    finally:
        streamlined.build_plan = build_plan


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Hide diffusers' and transformers' loading bars and notes (e.g. the torchvision fallback warning)."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    levels = dlogging.get_verbosity(), tlogging.get_verbosity()
    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        yield
    finally:
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()
        dlogging.set_verbosity(levels[0])
        tlogging.set_verbosity(levels[1])


# ------------------------------------------------------------------------------------------------- writing


def _to_uint8(frames: Any) -> Any:
    """The first video of the pipeline's ``np`` output, (frames, H, W, 3) floats in [0, 1], as uint8."""
    import numpy as np

    video = np.asarray(frames)[0]
    return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)


def _fps(kind: str) -> int:
    return {**_IMAGE_PIPELINES, **_TEXT_PIPELINES}[kind]


def _video_path(path: str) -> str:
    """The file a video for ``path`` is written to: an ``.mp4`` without ffmpeg becomes a ``.gif`` beside it."""
    if path.lower().endswith(".mp4") and importlib.util.find_spec("imageio_ffmpeg") is None:
        return os.path.splitext(path)[0] + ".gif"
    return path


def _write_video(path: str, frames: Any, fps: int) -> str:
    """Write ``frames`` to ``path`` (from :func:`_video_path`). Returns the path written."""
    import imageio.v3 as iio

    if path.lower().endswith(".mp4"):
        import imageio.v2

        # libx264 with yuv420p, which players expect; sizes are multiples of 8, so no resizing.
        with imageio.v2.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1,
                                   quality=8) as writer:
            for frame in frames:
                writer.append_data(frame)
        return path
    iio.imwrite(path, frames, extension=".gif", duration=1000 / fps, loop=0)
    return path
