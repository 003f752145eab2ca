"""CPU benchmark: the DiT-era VAE decodes, diffusers' tiled decode against fxstream's exact streamed decode.

    python benchmarks/vae_tiling_cpu.py    # the five medium decodes: benchmarks/results/vae_tiling_cpu.md
    python benchmarks/vae_tiling_cpu.py --models ltx-vae-decoder --size tiny --repeats 1 --out /tmp/t.md

Every single-GPU remedy diffusers ships for these VAEs cuts the video into overlapping tiles (and, where the
class has them, windows of frames), decodes each alone and blends the seams: less memory, another output.
fxstream streams the same untiled decode band by band of rows, exactly. For each zoo model
(``fxstream.models``: random fp32 weights, each VAE's own ``decode``, every switch off) four variants:

- eager: the untiled decode, the reference.
- diffusers tiling: ``vae.enable_tiling(...)`` with tiles of half the frame (stride 3/4 of a tile, on the
  latent grid: 64 px tiles at stride 48 px for 128x128), so the medium size really is tiled, and the class's
  frame tiles where it has them (see ``tile_settings``). It runs on a deep copy of the module (the same
  weights), so the module fxstream compiled never sees a switch change (its guards would recompile).
- fxstream min: ``fxstream.compile(module)``, the least memory the planner reaches.
- fxstream middle: ``fxstream.compile(module, budget)`` with budget = weights + halfway between the minimum's
  and eager's predicted activation peaks (as ``tests/test_rows.py`` computes ``middle``).

Measured here: the activation peak of one call (``fxstream.measure``: tensor storage created during the call
and alive at once; the weights are resident and not counted), the decode time (median of ``--repeats``
rounds that call the variants round-robin, one call each per round, after one warm-up call each; fxstream's
capture and planning are the first call's and reported apart), and the error against eager: max abs diff,
PSNR (eager's output range as the data range; inf when equal) and max|diff| / max|eager|. fxstream's outputs
are asserted within 1e-5 of eager (relative) in every call. The plan cache is off, so compile times are
planning.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxstream  # noqa: E402
from common import mib, write_results  # noqa: E402
from fxstream import models  # noqa: E402

MODELS = ("wan-vae-decoder", "hunyuanvideo-vae-decoder", "ltx-vae-decoder", "cogvideox-vae-decoder",
          "mochi-vae-decoder")
VARIANTS = ("eager", "diffusers tiling", "fxstream min", "fxstream middle")
EXACT = 1e-5  # fxstream's largest relative error against eager, asserted
HEADERS = ["model", "variant", "activation peak MiB", "vs eager", "decode s (median)", "compile s",
           "max abs diff", "PSNR dB", "rel. error", "predicted MiB", "row-streamed (bands)"]


def tile_settings(vae: torch.nn.Module, z: torch.Tensor, ref: torch.Tensor, tile_px: int | None = None,
                  stride_px: int | None = None) -> tuple[dict, dict, str]:
    """``(enable_tiling kwargs, attributes set after it, description)`` for ``vae`` at this latent.

    Spatial tiles of ``tile_px`` (default: half the frame's shorter side) at a stride of ``stride_px``
    (default: 3/4 of a tile), both on the latent grid. Frames: HunyuanVideo and LTX-Video tile them with
    ``use_framewise_decoding`` (windows of two latent frames, one latent frame apart:
    ``tile_sample_min_num_frames = tile_sample_stride_num_frames`` = the temporal ratio; HunyuanVideo's
    defaults, 16 frames, do not tile a clip this short); Mochi decodes batches of
    ``num_latent_frames_batch_size`` latent frames with ``use_framewise_decoding``; CogVideoX's frame batches
    are always on (its untiled decode too); Wan's decode is its causal loop over latent frames already, with
    no frame option.
    """
    cls = type(vae).__name__
    ratio = ref.shape[-2] // z.shape[-2]  # pixels per latent row
    tile = tile_px or min(ref.shape[-2:]) // 2
    tile = max(ratio, tile // ratio * ratio)
    stride = stride_px or max(ratio, (tile * 3 // 4) // ratio * ratio)
    latent_h, latent_w, latent_t = z.shape[-2], z.shape[-1], z.shape[2]
    kwargs = {"tile_sample_min_height": tile, "tile_sample_min_width": tile}
    extra: dict = {}
    if cls == "AutoencoderKLCogVideoX":
        # tiles are placed by an overlap factor: the latent stride is int(tile_latent * (1 - factor))
        factor = 1 - stride / tile
        kwargs.update(tile_overlap_factor_height=factor, tile_overlap_factor_width=factor)
        latent_stride = int(tile // ratio * (1 - factor))
        batch = vae.num_latent_frames_batch_size
        frames = (f"frame batches of {batch} latent frames are always on (the untiled decode's too; "
                  f"{latent_t} latent frames: {_plural(max(latent_t // batch, 1), 'batch')})")
        windows = 1
    else:
        kwargs.update(tile_sample_stride_height=stride, tile_sample_stride_width=stride)
        latent_stride = stride // ratio
        if hasattr(vae, "tile_sample_min_num_frames"):  # HunyuanVideo, LTX-Video
            t = vae.temporal_compression_ratio
            kwargs.update(tile_sample_min_num_frames=t, tile_sample_stride_num_frames=t)
            extra["use_framewise_decoding"] = True
            windows = latent_t
            frames = (f"use_framewise_decoding, tile_sample_min_num_frames = "
                      f"tile_sample_stride_num_frames = {t}: {windows} windows z[:, :, i:i+2] (the last, "
                      "one latent frame, decoded and dropped), no blend")
        elif cls == "AutoencoderKLMochi":
            # Mochi's own switch, vae._enable_framewise_decoding(), also sets its causal convolutions'
            # pad_mode to "constant" after they were built for "replicate" and then fails ("Kernel size can't
            # be greater than actual input size"); the flag alone decodes each batch with replicate padding.
            batch = vae.num_latent_frames_batch_size
            extra["use_framewise_decoding"] = True
            windows = math.ceil(latent_t / batch)
            frames = f"use_framewise_decoding: {_plural(windows, 'batch')} of {batch} latent frames"
        else:  # Wan
            windows = 1
            frames = "none (the decode loops over latent frames with causal caches anyway)"
    grid_h = len(range(0, latent_h, latent_stride))
    grid_w = len(range(0, latent_w, latent_stride))
    spatial = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in kwargs.items()
                        if "num_frames" not in k)
    text = (f"enable_tiling({spatial}): {grid_h}x{grid_w} tiles of {tile} px at stride "
            f"{latent_stride * ratio} px; frames: {frames}")
    if windows > 1:
        text += f"; {grid_h * grid_w * windows} tile decodes"
    return kwargs, extra, text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("h") else f"{n} {word}s"


def tiled_copy(module: torch.nn.Module, kwargs: dict, extra: dict) -> torch.nn.Module:
    """A deep copy of the zoo's ``VaeDecode`` with diffusers' tiling (and frame options) switched on."""
    tiled = copy.deepcopy(module)
    tiled.vae.enable_tiling(**kwargs)
    for name, value in extra.items():
        setattr(tiled.vae, name, value)
    return tiled


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(max abs diff, PSNR in dB with ref's range as the data range, max|diff| / max|ref|)."""
    diff = (out.double() - ref.double()).abs()
    mse = float((diff**2).mean())
    data_range = float(ref.max() - ref.min())
    psnr = math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
    return float(diff.max()), psnr, float(diff.max() / ref.abs().max())


def _check_exact(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    rel = errors(out, ref)[2]
    assert rel <= EXACT, f"{name}: fxstream's decode differs from eager's by {rel:.2e} (relative)"


def run(name: str, size: str, repeats: int, tile_px: int | None, stride_px: int | None) -> tuple[list, str]:
    built = models.build(name, size)
    module, z = built.module, built.args[0]
    with torch.no_grad():
        eager = fxstream.measure(module, z)
    ref = eager.output
    kwargs, extra, settings = tile_settings(module.vae, z, ref, tile_px, stride_px)
    tiled = tiled_copy(module, kwargs, extra)

    compiled, compile_s = {}, {}
    low = fxstream.compile(module)
    with torch.no_grad():
        _check_exact(name, low(z), ref)
    plan = low.plan
    weights = plan.predicted_peak_bytes - plan.predicted_activation_peak_bytes
    middle = weights + (plan.predicted_activation_peak_bytes + plan.baseline_activation_peak_bytes) // 2
    mid = fxstream.compile(module, middle / 2**30)
    with torch.no_grad():
        _check_exact(name, mid(z), ref)
    assert mid.plan.predicted_peak_bytes <= middle, (mid.plan.predicted_peak_bytes, middle)
    compiled = {"fxstream min": low, "fxstream middle": mid}
    compile_s = {k: m.compiled.compile_seconds for k, m in compiled.items()}
    fns = {"eager": module, "diffusers tiling": tiled, **compiled}

    peaks, outputs = {"eager": eager.activation_peak_bytes}, {"eager": ref}
    with torch.no_grad():
        for variant, fn in fns.items():
            fn(z)  # warm-up
        for variant in VARIANTS[1:]:
            got = fxstream.measure(fns[variant], z)
            peaks[variant], outputs[variant] = got.activation_peak_bytes, got.output
        times = {v: [] for v in VARIANTS}
        for _ in range(repeats):  # round-robin: the machine's noise falls on every variant alike
            for variant, fn in fns.items():
                start = time.perf_counter()
                out = fn(z)
                times[variant].append(time.perf_counter() - start)
                if variant in compiled:
                    _check_exact(name, out, ref)
    for variant, m in compiled.items():
        _check_exact(name, outputs[variant], ref)
        assert not m._fx_recompiles, f"{name} {variant} recompiled: {m._fx_recompiles}"

    rows = []
    for variant in VARIANTS:
        if variant == "eager":
            err = ["-", "-", "-"]
        else:
            diff, psnr, rel = errors(outputs[variant], ref)
            err = [f"{diff:.1e}", "inf" if math.isinf(psnr) else f"{psnr:.1f}", f"{rel:.1e}"]
        m = compiled.get(variant)
        predicted = m.plan.predicted_activation_peak_bytes if m else (
            plan.baseline_activation_peak_bytes if variant == "eager" else None)
        streamed = [str(g.slices) for g in m.plan.groups if g.kind == "rows" and g.slices > 1] if m else []
        bands = ", ".join(streamed)
        rows.append([name, variant, mib(peaks[variant]), f"{peaks[variant] / peaks['eager']:.2f}",
                     f"{statistics.median(times[variant]):.2f}",
                     f"{compile_s[variant]:.1f}" if variant in compile_s else "-", *err, mib(predicted),
                     bands or "-"])
    shape = f"{built.frames} x {built.height}x{built.width}"
    return rows, f"| {name} | {type(module.vae).__name__} | {shape} | {tuple(z.shape)} | {settings} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--size", default="medium", choices=("medium", "tiny"))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each calls every variant once)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tile-px", type=int, default=None,
                        help="diffusers' tile size in pixels (default: half the frame)")
    parser.add_argument("--stride-px", type=int, default=None,
                        help="diffusers' tile stride in pixels (default: 3/4 of a tile, on the latent grid)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "vae_tiling_cpu.md"))
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    threads = torch.get_num_threads()
    cache = os.environ.get("FXSTREAM_PLAN_CACHE")
    os.environ["FXSTREAM_PLAN_CACHE"] = "0"  # plan every time: compile s is capture + planning
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    start = time.perf_counter()
    rows, settings = [], []
    try:
        for name in names:
            print(f"{name} ({args.size}) ...", file=sys.stderr, flush=True)
            model_rows, setting = run(name, args.size, args.repeats, args.tile_px, args.stride_px)
            rows += model_rows
            settings.append(setting)
            print(tabulate(model_rows, HEADERS, disable_numparse=True), flush=True)
        _write(args, rows, settings, start)  # inside: the machine line records the threads used
    finally:
        torch.set_num_threads(threads)
        if cache is None:
            os.environ.pop("FXSTREAM_PLAN_CACHE", None)
        else:
            os.environ["FXSTREAM_PLAN_CACHE"] = cache


def _write(args, rows: list, settings: list[str], start: float) -> None:
    table = tabulate(rows, HEADERS, tablefmt="github", disable_numparse=True)
    print(table)
    intro = (
        f"The zoo's {args.size} DiT-era VAE decodes (`fxstream.models`, random fp32 weights, each VAE's own "
        f"`decode` with every switch off), on this CPU with {args.threads} thread(s). Variants: eager (the "
        "untiled decode, the reference); diffusers tiling (`vae.enable_tiling(...)` and the class's frame "
        "options, settings below); fxstream min (`fxstream.compile(module)`); fxstream middle (budget = "
        "weights + halfway between the minimum's and eager's predicted activation peaks). Activation peak: "
        "`fxstream.measure` (tensor storage created during one call and alive at once; weights resident, not "
        "counted). Decode s: median of "
        f"{args.repeats} round(s) calling the variants round-robin, after one warm-up call each; compile s: "
        "fxstream's capture + planning (first call, plan cache off). Errors against eager's decode: max abs "
        "diff, PSNR (eager's output range as the data range), max|diff| / max|eager|. Predicted: the plan's "
        "activation peak (eager's row: the baseline the planner models). Row-streamed: bands per "
        "row-streamed segment."
    )
    how = (f"tiles of {args.tile_px} px" if args.tile_px else "tiles of half the frame") + (
        f" at a stride of {args.stride_px} px" if args.stride_px else " at a stride of 3/4 of a tile")
    settings_intro = f"Tile settings ({how}, on the latent grid; the frame options where the class has them):"
    settings_table = "\n".join(["| model | class | frames x size | latent | diffusers tiling |",
                                "|---|---|---|---|---|", *settings])
    notes = (
        "The weights are random, so the size of the tiled decode's error says little about a trained "
        "VAE's (whose blended seams are usually much fainter); what does not depend on the weights: it is "
        "not zero, and fxstream's is fp32 rounding. The CPU is shared with other jobs: decode times swing "
        "between rounds."
    )
    footer = f"Total run time {time.perf_counter() - start:.0f} s."
    write_results(args.out, "DiT-era VAE decodes on CPU: diffusers' tiling vs fxstream's exact streaming",
                  [intro, "", table, "", settings_intro, "", settings_table, "", notes, "", footer])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
