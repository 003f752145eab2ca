"""Predicted memory of the AnimateDiff pipeline with diffusers' layerwise casting (float8 weights), full size.

    python benchmarks/layerwise_casting.py      # writes benchmarks/results/layerwise_casting.md

The real architectures on the meta device (no weights, no memory, no GPU), fp16 compute, classifier-free
guidance on, target CUDA: the AnimateDiff UNet (16 frames 512x512) as stored in fp16 and as stored in float8
(``apply_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float16)``, diffusers'
default skip patterns: norms, ``conv_in``/``conv_out``-like projections stay fp16), each eager and at
fxstream's minimum; then the whole pipeline: resident weights (UNet as stored, the fp16 VAE and CLIP text
encoder, counted from the model cards' parameter counts) plus the larger of the UNet step's and the VAE
decode's activation peaks (the decoder's from the same planner, fp16).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxstream  # noqa: E402
from common import gib, write_results  # noqa: E402
from fxstream.capture import normalize_inputs  # noqa: E402
from fxstream.models import build  # noqa: E402
from plan_table import CLIP_TEXT_L_PARAMS, SD_VAE_PARAMS  # noqa: E402

FP16 = 2
OUT = Path(__file__).resolve().parent / "results" / "layerwise_casting.md"


def planned(name: str, *, storage: torch.dtype | None) -> dict:
    started = time.perf_counter()
    built = build(name, "full", dtype=torch.float16)
    if storage is not None:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(built.module, storage_dtype=storage, compute_dtype=torch.float16)
    flat, _ = normalize_inputs(built.module, built.args, built.kwargs)
    plan = fxstream.plan(built.module, *flat, budget_gb=None, target="cuda")
    out = dict(weights=plan.weight_bytes, eager_act=plan.baseline_activation_peak_bytes,
               min_act=plan.predicted_activation_peak_bytes, seconds=time.perf_counter() - started,
               shape=f"{built.frames} frames {built.height}x{built.width}")
    print(f"{name} storage={storage}: {out}", flush=True)
    return out


def main() -> int:
    decoder = planned("sd-vae-decoder", storage=None)
    rows, pipe_rows = [], []
    others = (SD_VAE_PARAMS + CLIP_TEXT_L_PARAMS) * FP16
    for label, storage in (("fp16", None), ("float8_e4m3fn (layerwise casting)", torch.float8_e4m3fn)):
        unet = planned("animatediff", storage=storage)
        rows.append([label, gib(unet["weights"]), gib(unet["weights"] + unet["eager_act"]),
                     gib(unet["weights"] + unet["min_act"]), f"{unet['seconds']:.0f} s"])
        resident = unet["weights"] + others
        pipe_rows.append([label, gib(resident),
                          gib(resident + max(unet["eager_act"], decoder["eager_act"])),
                          gib(resident + max(unet["min_act"], decoder["min_act"]))])
    model = tabulate(rows, headers=["AnimateDiff UNet weights stored as", "weights GiB", "eager peak GiB",
                                    "fxstream minimum GiB", "capture + plan"], tablefmt="github")
    pipe = tabulate(pipe_rows, headers=["UNet weights stored as", "resident weights GiB",
                                        "pipeline peak, eager GiB", "pipeline peak, fxstream minimum GiB"],
                    tablefmt="github")
    text = [
        "Predicted (passes/memory.py), full-size architectures on the meta device; fp16 compute, CFG on, target "
        "CUDA; AnimateDiff UNet at 16 frames 512x512, SD VAE decoder of the 16 frames at once.",
        "",
        "## The UNet", "", model, "",
        "## The whole pipeline", "",
        f"Resident weights: the UNet as stored, plus the fp16 VAE ({SD_VAE_PARAMS:,} parameters, encoder kept "
        f"resident) and CLIP text encoder ({CLIP_TEXT_L_PARAMS:,}); the peak adds the larger of the UNet step's "
        f"and the VAE decode's activation peaks (decoder: eager {gib(decoder['eager_act'])} GiB, fxstream minimum "
        f"{gib(decoder['min_act'])} GiB of activations).", "",
        pipe, "",
    ]
    write_results(OUT, "Layerwise casting (float8 weights) with fxstream: AnimateDiff, predicted", text)
    print("\n".join(text))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
