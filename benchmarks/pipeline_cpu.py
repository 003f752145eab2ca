"""CPU benchmark: the whole-pipeline activation peak of a medium SVD pipeline, eager vs ``fxstream.optimize``.

    python benchmarks/pipeline_cpu.py                 # writes benchmarks/results/pipeline_cpu.md
    python benchmarks/pipeline_cpu.py --frames 4 --steps 1 --out /tmp/pipeline_cpu.md

The pipeline is ``fxstream.pipelines.build("svd", "medium")``: the zoo's medium SVD UNet and VAE decoder
(random fp32 weights), a one-layer CLIP image encoder, SVD's Euler scheduler; ``--frames`` frames at
``--height`` x ``--width``, all frames decoded at once (SVD's default ``decode_chunk_size``). Variants:

- eager: the pipeline as diffusers runs it.
- fxstream min: ``fxstream.optimize(pipe, "min")``: the lowest peak the planner reaches for the UNet and the decoder.
- fxstream budget: ``fxstream.optimize(pipe, budget_gb=B)`` with B halfway between the min plan's predicted
  whole-pipeline peak and the eager one (the larger of the two components' peaks, all weights included).
- fxstream budget (the UNet's floor): B is the UNet's minimum predicted whole-pipeline peak, so the decoder only
  has to fit under what the denoising loop needs anyway (its tail row-streamed with less recomputation than
  at its own minimum).

Measured: the activation peak of one whole ``pipe(...)`` call (``fxstream.measure``: tensor storage created
during the call and alive at once; the weights are resident and not counted), after a warm-up call that
compiles, and its time; the frames' largest difference from eager. Per phase, the activation peak of each
component's call as the pipeline makes it (the inputs recorded during the warm-up), eager and compiled: the
phases that fxstream leaves eager (CLIP image encoder, VAE encoder) are there to show they are not the peak.
"""

from __future__ import annotations

import argparse
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
from common import mib, write_results  # noqa: E402
from fxstream import pipelines  # noqa: E402
from fxstream.measure import measure  # noqa: E402

# (label, dotted path from the pipeline) of every phase that runs a module.
PHASES = (("CLIP image encoder", "image_encoder"), ("VAE encoder", "vae.encoder"),
          ("UNet (one step)", "unet"), ("VAE decoder", "vae.decoder"))


def _module(pipe, path: str) -> torch.nn.Module:
    obj = pipe
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class _Recorder:
    """Records the first call's arguments of each phase's module (a forward pre-hook)."""

    def __init__(self, pipe):
        self.calls: dict[str, tuple[tuple, dict]] = {}
        self._handles = [
            _module(pipe, path).register_forward_pre_hook(self._hook(path), with_kwargs=True)
            for _, path in PHASES
        ]

    def _hook(self, path):
        def hook(_module, args, kwargs):
            self.calls.setdefault(path, (args, kwargs))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _phase_peaks(pipe, calls) -> dict[str, int]:
    return {path: measure(_module(pipe, path), *calls[path][0], **calls[path][1]).activation_peak_bytes
            for _, path in PHASES}


def _run(pipe, image, args, steps=None) -> np.ndarray:
    return np.asarray(pipe(image, num_frames=args.frames, height=args.height, width=args.width,
                           num_inference_steps=steps or args.steps, output_type="np",
                           generator=torch.Generator().manual_seed(0)).frames)


def _variant(pipe, image, args, budget_gb, recorded, *, rehash=None, steps=None):
    """Warm-up call (compiles, records phase inputs), then the measured call: (frames, peak, seconds, phases,
    optimization)."""
    optimization = None if budget_gb == "eager" else fxstream.optimize(pipe, budget_gb, rehash=rehash)
    recorder = _Recorder(pipe)
    _run(pipe, image, args, steps)
    recorder.remove()
    calls = recorded if recorded is not None else recorder.calls
    m = measure(lambda: _run(pipe, image, args, steps))
    if optimization is not None and optimization.rehash is not None:
        # the steps of the measured call (the per-phase calls below are not steps of a generation)
        optimization.measured_full_steps = list(optimization.rehash.full_steps_run)
    phases = _phase_peaks(pipe, calls)
    return m.output, m.activation_peak_bytes, m.seconds, phases, optimization, recorder.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rehash-steps", type=int, default=10,
                        help="steps of the Step Rehash comparison (fxstream min with and without rehash)")
    parser.add_argument("--out", default="benchmarks/results/pipeline_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    start = time.perf_counter()

    pipe = pipelines.build("svd", "medium")
    pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray(
        (np.random.default_rng(0).random((args.height, args.width, 3)) * 255).astype(np.uint8))
    weights = sum(pipelines._storages(*pipelines._pipeline_modules(pipe)).values())

    rows, phase_rows = [], []
    print("eager ...", file=sys.stderr)
    ref, eager_peak, eager_s, eager_phases, _, calls = _variant(pipe, image, args, "eager", None)
    rows.append(["eager", mib(eager_peak), mib(weights + eager_peak), "1.00", "-", f"{eager_s:.1f}", "-", "-",
                 ""])

    print("fxstream min ...", file=sys.stderr)
    out, peak, seconds, phases, opt, _ = _variant(pipe, image, args, None, calls)
    floors = {c.path: c.pipeline_peaks()[0] for c in opt.components}  # (signature, baseline, planned)
    predicted_min = max(planned for _, _, planned in floors.values())
    predicted_eager = max(baseline for _, baseline, _ in floors.values())
    rows.append(_row("fxstream min", peak, weights, eager_peak, predicted_min, seconds, opt, out, ref))
    phase_table = {"eager": eager_phases, "fxstream min": phases}

    halfway, unet_floor = (predicted_min + predicted_eager) // 2, int(floors["unet"][2] * 1.001)
    for budget, label in ((halfway, f"fxstream budget {mib(halfway)} MiB"),
                          (unet_floor, f"fxstream budget {mib(unet_floor)} MiB (the UNet's floor)")):
        print(f"{label} ...", file=sys.stderr)
        out, peak, seconds, phases, opt, _ = _variant(pipe, image, args, budget / 2**30, calls)
        predicted = max(planned for c in opt.components for _, _, planned in c.pipeline_peaks())
        rows.append(_row(label, peak, weights, eager_peak, predicted, seconds, opt, out, ref))
        phase_table[label] = phases

    # Step Rehash: the same minimum-memory plan, with and without rehash="auto", at more steps.
    rehash_rows = []
    for name, rehash in (("fxstream min", None), ("fxstream min + rehash auto", "auto")):
        print(f"{name}, {args.rehash_steps} steps ...", file=sys.stderr)
        out, peak, seconds, _, opt, _ = _variant(pipe, image, args, None, calls, rehash=rehash,
                                                 steps=args.rehash_steps)
        full = (f"{len(opt.measured_full_steps)}/{args.rehash_steps}" if opt.rehash is not None
                else f"{args.rehash_steps}/{args.rehash_steps}")
        if rehash is None:
            base_out, base_s = out, seconds
        rehash_rows.append([name, full, mib(peak), mib(weights + peak), f"{seconds:.1f}",
                            f"{base_s / seconds:.2f}x", f"{float(np.abs(out - base_out).max()):.1e}"])
    opt.restore()

    for label_, path in PHASES:
        phase_rows.append([label_, *(mib(p[path]) for p in phase_table.values())])

    size = f"{args.frames} frames {args.height}x{args.width}, {args.steps} steps"
    intro = (
        f"A medium SVD pipeline (`fxstream.pipelines.build(\"svd\", \"medium\")`: the zoo's medium UNet "
        f"and VAE decoder, random fp32 weights, {mib(weights)} MiB of weights in all), {size}, "
        "classifier-free guidance on (UNet batch 2), all frames decoded at once, on this CPU with "
        f"{args.threads} thread(s). Activation peak: live tensor storage created during one whole "
        "`pipe(...)` call and alive at once, measured by `fxstream.measure` after a warm-up call that "
        "compiles (weights resident, not counted); total = weights + activation peak. Predicted: the larger "
        "of the UNet's and the decoder's planned whole-pipeline peaks (`PipelineOptimization.report()`). "
        "Time: the measured call, with the CPU tracking overhead. max abs diff: the frames (floats in "
        "[0, 1]) against eager's."
    )
    rehash_intro = (
        f"Step Rehash in the pipeline: the minimum-memory plan with and without `rehash=\"auto\"` (every "
        f"other step in full, and the last), {args.rehash_steps} steps, same measurement. The weights are "
        "random, so the frames' difference says nothing about fidelity (see `rehash_cpu.md` for trained "
        "models); the cached feature's memory is in the measured peak."
    )
    rehash_table = tabulate(rehash_rows, headers=["variant", "full steps", "activation peak MiB (measured)",
                                                  "total MiB", "time s", "speedup", "max abs diff"],
                            tablefmt="github")
    table = tabulate(rows, headers=["variant", "activation peak MiB (measured)", "total MiB (measured)",
                                    "vs eager", "predicted total MiB", "time s", "max abs diff",
                                    "compile s", "groups sliced"], tablefmt="github")
    phases_intro = (
        "Activation peak per phase (MiB, measured): each module called alone on the arguments the pipeline "
        "passed it. fxstream compiles the UNet and the VAE decoder; the CLIP image encoder (one 224x224 "
        "image) and the VAE encoder (one frame) stay eager in every variant."
    )
    phases = tabulate(phase_rows, headers=["phase", *phase_table], tablefmt="github")
    footer = f"Total run time {time.perf_counter() - start:.0f} s."
    write_results(args.out, "Whole-pipeline memory on CPU: medium SVD, eager vs fxstream.optimize",
                  [intro, "", table, "", phases_intro, "", phases, "", rehash_intro, "", rehash_table, "",
                   footer])
    print(Path(args.out).read_text())


def _row(label, peak, weights, eager_peak, predicted, seconds, opt, out, ref) -> list:
    def groups(plan) -> str:
        rows = [g for g in plan.sliced_groups if g.kind == "rows"]
        text = str(len(plan.sliced_groups) - len(rows))
        return text + "".join(f" + rows ({g.slices} bands, {g.axis.split(', ')[-1]})" for g in rows)

    sliced = ", ".join(f"{c.path} {groups(c.module.plan)}" for c in opt.components)
    diff = float(np.abs(out - ref).max())
    return [label, mib(peak), mib(weights + peak), f"{peak / eager_peak:.2f}", mib(predicted),
            f"{seconds:.1f}", f"{diff:.1e}", f"{opt.compile_seconds:.1f}", sliced]


if __name__ == "__main__":
    main()
