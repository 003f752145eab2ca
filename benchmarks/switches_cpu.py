"""Side by side on CPU: a medium SVD pipeline eager, with diffusers' own memory switches, and with fxstream at the
switches' measured peak.

    python benchmarks/switches_cpu.py                 # writes benchmarks/results/switches_cpu.md and .json
    python benchmarks/switches_cpu.py --rounds 1 --frames 4 --out /tmp/switches.md

The pipeline is ``fxstream.pipelines.build("svd", "medium")`` (random fp32 weights), ``--frames`` frames at
``--height`` x ``--width``, ``--steps`` steps, classifier-free guidance on. Variants:

- eager: the pipeline as diffusers runs it, all frames decoded at once;
- diffusers' switches: ``pipe.unet.enable_forward_chunking(1, 0)`` (the temporal feed-forwards one item at a
  time) and ``decode_chunk_size=1`` (the VAE decodes one frame at a time: SVD's temporal decoder mixes frames,
  so this changes the video);
- fxstream: a second pipeline with the same weights, ``fxstream.optimize(pipe, budget_gb=B)`` with B the
  switches' measured activation peak plus every component's weights, all frames decoded at once.

Activation peak: ``fxstream.measure`` on one whole call (after a warm-up call that compiles). Time: plain calls
(no measuring mode) in ``--rounds`` rounds that run each variant once, so that load from other jobs falls on all
alike; the median per variant. Frames: max |frames - eager's| (floats in [0, 1]). Predicted: the time model's
seconds of the compiled UNet (times the UNet calls) and decoder over their eager predictions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxstream  # noqa: E402
from common import command, commit, machine, mib, write_results  # noqa: E402
from fxstream import pipelines  # noqa: E402
from fxstream.measure import measure  # noqa: E402
from plan_table import disable_ff_chunking  # noqa: E402

SWITCHES = "diffusers' switches"
FX = "fxstream at the switches' peak"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/switches_cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    plain, compiled = pipelines.build("svd", "medium"), pipelines.build("svd", "medium")
    for p in (plain, compiled):
        p.set_progress_bar_config(disable=True)
    weights = sum(pipelines._storages(*pipelines._pipeline_modules(plain)).values())
    image = PIL.Image.fromarray(
        (np.random.default_rng(0).random((args.height, args.width, 3)) * 255).astype(np.uint8))

    def call(pipe, **extra):
        return np.asarray(pipe(image, num_frames=args.frames, height=args.height, width=args.width,
                               num_inference_steps=args.steps, output_type="np",
                               generator=torch.Generator().manual_seed(0), **extra).frames)

    def switches_on():
        plain.unet.enable_forward_chunking(1, 0)

    def switches_off():
        disable_ff_chunking(plain.unet)

    def run_switches():
        switches_on()
        try:
            return call(plain, decode_chunk_size=1)
        finally:
            switches_off()

    variants = {"eager": lambda: call(plain, decode_chunk_size=args.frames), SWITCHES: run_switches}
    peaks, frames = {}, {}
    for label, fn in variants.items():
        log(f"{label}: warm-up and measured call")
        fn()
        m = measure(fn)
        peaks[label], frames[label] = m.activation_peak_bytes, m.output
    budget = peaks[SWITCHES] + weights
    log(f"fxstream at the switches' peak: budget {mib(budget)} MiB (weights {mib(weights)} MiB)")
    opt = fxstream.optimize(compiled, budget / 2**30, target="cpu")
    variants[FX] = lambda: call(compiled, decode_chunk_size=args.frames)
    variants[FX]()
    m = measure(variants[FX])
    peaks[FX], frames[FX] = m.activation_peak_bytes, m.output

    times = {k: [] for k in variants}
    for r in range(args.rounds):
        log(f"timing round {r + 1}/{args.rounds}")
        for k, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}

    plans = {c.path: c.module.plan for c in opt.components}
    unet_calls = args.steps
    predicted = sum((p.predicted_seconds or 0) * (unet_calls if path == "unet" else 1) for path, p in plans.items())
    predicted_eager = sum((p.baseline_seconds or 0) * (unet_calls if path == "unet" else 1)
                          for path, p in plans.items())

    def groups(plan) -> str:
        rows = [g for g in plan.sliced_groups if g.kind == "rows"]
        return str(len(plan.sliced_groups) - len(rows)) + "".join(
            f" + rows ({g.slices} bands, {g.passes} passes)" for g in rows)

    ref = frames["eager"]
    rows, data = [], []
    for k in variants:
        diff = float(np.abs(frames[k] - ref).max())
        note = ""
        if k.startswith("fxstream"):
            note = "; ".join(f"{path}: {groups(p)} sliced, predicted {p.predicted_slowdown:.2f}x eager"
                             for path, p in plans.items())
        rows.append([k, mib(peaks[k]), mib(peaks[k] + weights), f"{med[k]:.2f} ({min(times[k]):.2f})",
                     f"{med[k] / med['eager']:.2f}", f"{med[k] / med[SWITCHES]:.2f}",
                     "-" if k == "eager" else f"{diff:.1e}", note])
        data.append({"variant": k, "activation_peak_bytes": peaks[k], "seconds": times[k], "max_abs_diff": diff})
    headers = ["variant", "activation peak MiB (measured)", "total MiB", "time s (median (min))", "vs eager",
               "vs switches", "frames: max abs diff vs eager", "plan"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    verdict = [
        f"- fxstream's frames within 1e-4 of eager's: {'yes' if data[2]['max_abs_diff'] <= 1e-4 else 'no'} "
        f"({data[2]['max_abs_diff']:.1e}); activation peak at or under the switches': "
        f"{'yes' if peaks[FX] <= peaks[SWITCHES] else 'no'}; time over the "
        f"switches': {med[FX] / med[SWITCHES]:.2f}x (goal <= 1.15x).",
        f"- The time model predicted the compiled UNet ({unet_calls} calls) and decoder at {predicted:.1f} s against "
        f"{predicted_eager:.1f} s eager ({predicted / predicted_eager:.2f}x); measured, the whole pipeline "
        f"{med[FX] / med['eager']:.2f}x eager's.",
    ]
    intro = (f"Medium SVD pipeline (`fxstream.pipelines.build(\"svd\", \"medium\")`, random fp32 weights, "
             f"{mib(weights)} MiB of weights), {args.frames} frames {args.height}x{args.width}, {args.steps} steps, "
             f"guidance on, {args.threads} thread(s); {args.rounds} timing rounds. See the script's docstring for "
             "the variants and what is measured.")
    write_results(args.out, "Side by side: eager, diffusers' memory switches, fxstream at their peak (CPU)",
                  [intro, "", table, "", *verdict, "", f"Total run time {time.perf_counter() - started:.0f} s."])
    Path(args.out).with_suffix(".json").write_text(json.dumps({
        "command": command(), "commit": commit(), "machine": machine(), "budget_bytes": budget,
        "weight_bytes": weights, "variants": data, "predicted_seconds": predicted,
        "predicted_eager_seconds": predicted_eager}, indent=2) + "\n")
    print(Path(args.out).read_text())
    opt.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
