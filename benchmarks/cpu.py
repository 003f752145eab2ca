"""CPU benchmark: measured memory and latency of eager, eager with FF chunking, and fxstream, at medium sizes.

    python benchmarks/cpu.py                         # writes benchmarks/results/cpu.md
    python benchmarks/cpu.py --models svd-vae-decoder --repeats 1 --out /tmp/cpu.md

Zoo models at size "medium" (random fp32 weights, 8 frames 256x256, classifier-free guidance on for the
UNets), on the CPU with ``--threads`` intra-op threads (default 2). For each model:

- eager: the diffusers module as it is.
- eager + FF chunking (UNets only): diffusers' feed-forward chunking, one frame per chunk
  (``plan_table.enable_ff_chunking``).
- fxstream min: ``fxstream.compile(budget_gb=None, target="cpu")``, the lowest peak the planner reaches.
- fxstream mid: a budget halfway between that plan's predicted peak and its predicted eager baseline
  (``plan.predicted_peak_bytes`` and ``plan.baseline_peak_bytes``, weights included).

Measured: the activation peak of one call (``fxstream.measure``: live tensor storage created during the call),
the median latency of ``--repeats`` calls (``time.perf_counter`` under ``torch.no_grad``, after a warm-up
call; in rounds that run every variant once, so that load from other jobs falls on all alike), both as ratios
to eager; compile time (capture + plan, the first call); max |out - eager| / max |eager|.
Results are written after every model, so a run cut short still leaves a table.
Step Rehash is measured on trained models by ``benchmarks/rehash_cpu.py``, not here.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxstream  # noqa: E402
from common import mib, write_results  # noqa: E402
from fxstream.measure import measure  # noqa: E402
from fxstream.models import build  # noqa: E402
from plan_table import disable_ff_chunking, enable_ff_chunking  # noqa: E402

MODELS = ("svd", "svd-vae-decoder", "animatediff")
HEADERS = ["model", "variant", "activation peak MiB (measured)", "predicted MiB", "memory vs eager",
           "latency s (median / min)", "latency vs eager (median)", "predicted s (vs eager)",
           "predicted / measured", "compile s", "max rel err", "notes"]


def _sample(out):
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


class Variant:
    """One way of running the model: ``call()`` runs it on the example inputs, with its setting on."""

    def __init__(self, label, fn, args, kwargs, *, enter=None, leave=None):
        self.label, self.fn, self.args, self.kwargs = label, fn, args, kwargs
        self.enter, self.leave = enter, leave
        self.times: list[float] = []
        self.peak = self.out = None
        self.predicted: float | None = None  # the time model's seconds (fxstream.Plan.predicted_seconds)
        self.row: list = []

    def call(self, timed: bool = False):
        if self.enter:
            self.enter()
        try:
            with torch.no_grad():
                start = time.perf_counter()
                out = self.fn(*self.args, **self.kwargs)
                if timed:
                    self.times.append(time.perf_counter() - start)
            return out
        finally:
            if self.leave:
                self.leave()

    def measure(self):
        """Warm-up call (for a compiled module, the compile), then one measured call."""
        self.call()
        if self.enter:
            self.enter()
        try:
            m = measure(self.fn, *self.args, **self.kwargs)
        finally:
            if self.leave:
                self.leave()
        self.peak, self.out = m.activation_peak_bytes, _sample(m.output).float()

    @property
    def latency(self) -> float:
        return statistics.median(self.times)


def run_model(name: str, *, frames, height, width, repeats: int, log) -> list[list]:
    """Memory of each variant one after the other; latency in rounds that time every variant once each, so
    that load from other jobs on a shared machine falls on all variants alike."""
    built = build(name, "medium", frames=frames, height=height, width=width, dtype=torch.float32)
    module, args, kwargs = built.module, built.args, built.kwargs
    log(f"{name}: medium, {built.frames}f {built.height}x{built.width}, "
        f"{built.num_parameters / 1e6:.1f} M parameters; eager")
    eager = Variant("eager", module, args, kwargs)
    eager.measure()
    ref = eager.out
    eager.row = [name, "eager", mib(eager.peak), "-", "1.00", None, "1.00", None, None, "-", "-", ""]
    variants = [eager]

    how = enable_ff_chunking(module)
    disable_ff_chunking(module)
    if how is not None:
        log(f"{name}: eager + FF chunking")
        chunked = Variant("eager + FF chunking", module, args, kwargs,
                          enter=lambda: enable_ff_chunking(module), leave=lambda: disable_ff_chunking(module))
        chunked.measure()
        chunked.row = [name, chunked.label, mib(chunked.peak), "-", f"{chunked.peak / eager.peak:.2f}", None,
                       None, "-", "-", "-", f"{_rel_err(chunked.out, ref):.1e}", f"`{how}`"]
        variants.append(chunked)

    first_plan = None
    for label in ("fxstream min", "fxstream mid"):
        if first_plan is None:
            budget_gb = None
        else:
            budget_gb = (first_plan.predicted_peak_bytes + first_plan.baseline_peak_bytes) / 2 / 2**30
        log(f"{name}: {label} (budget {'min' if budget_gb is None else f'{budget_gb * 1024:.1f} MiB'})")
        gc.collect()
        compiled = fxstream.compile(module, budget_gb=budget_gb, target="cpu")
        v = Variant(label, compiled, args, kwargs)
        v.measure()
        entry = compiled.compiled
        plan = entry.plan
        if first_plan is None:
            first_plan = plan
            eager.row[3] = mib(plan.baseline_activation_peak_bytes)  # the eager-lifetime prediction
            eager.predicted = plan.baseline_seconds  # the time model's eager call
        note = f"{len(plan.sliced_groups)} groups sliced"
        if budget_gb is not None:
            note = f"budget {budget_gb * 1024:.1f} MiB (weights incl.); " + note
        v.predicted = plan.predicted_seconds
        v.row = [name, label, mib(v.peak), mib(plan.predicted_activation_peak_bytes),
                 f"{v.peak / eager.peak:.2f}", None, None, None, None, f"{entry.compile_seconds:.1f}",
                 f"{_rel_err(v.out, ref):.1e}", note]
        variants.append(v)

    log(f"{name}: latency, {repeats} rounds of {len(variants)} variants")
    for v in variants:
        v.out = None
    for _ in range(repeats):
        for v in variants:
            v.call(timed=True)
    rows = []
    for v in variants:
        v.row[5] = f"{v.latency:.3f} / {min(v.times):.3f}"
        v.row[6] = f"{v.latency / eager.latency:.2f}"
        if v.predicted is not None and v.row[7] is None:
            v.row[7] = f"{v.predicted:.3f} ({v.predicted / eager.predicted:.2f})"
            v.row[8] = f"{v.predicted / v.latency:.2f}"
        rows.append(v.row)
    del variants, eager, module, args, kwargs, built
    gc.collect()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=None, help="default: the zoo's medium default (8)")
    parser.add_argument("--height", type=int, default=None, help="default: the zoo's medium default (256)")
    parser.add_argument("--width", type=int, default=None, help="default: the zoo's medium default (256)")
    parser.add_argument("--out", default="benchmarks/results/cpu.md")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)

    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    rows: list[list] = []
    notes: list[str] = []
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
                rows += run_model(name, frames=args.frames, height=args.height, width=args.width,
                                  repeats=args.repeats, log=log)
        except Exception as e:  # one model failing must not cost the others' rows
            traceback.print_exc()
            rows.append([name, "error", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                         f"{type(e).__name__}: {str(e)[:120]}"])
            gc.collect()
        table = tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)
        write_results(args.out, "fxstream CPU benchmark (medium models, measured)", [
            "Zoo models at size medium (random fp32 weights; 8 frames 256x256 unless the command says "
            "otherwise; UNets with classifier-free guidance, batch 2) on this CPU, "
            f"{args.threads} threads, on a machine shared with other jobs (latencies are noisy). Activation "
            "peak: live tensor storage created during one call, measured by `fxstream.measure` (weights and "
            "inputs excluded); predicted: fxstream's estimate (eager: the eager-lifetime baseline; fxstream: "
            "the plan's graph-lifetime peak). Latency: median and minimum of "
            f"{args.repeats} calls under `torch.no_grad` after a warm-up, timed in rounds that run every "
            "variant once (the minimum is the least disturbed by other jobs). Compile: capture + plan (the "
            "first call). Predicted s: the time model's seconds of one call (`Plan.predicted_seconds`; eager: "
            "`Plan.baseline_seconds`; in brackets, over eager's), from the shipped cost table of this device "
            "kind (`passes/costs_cpu.json`), and over the measured median. "
            "max rel err: max |out - eager| / max |eager|.",
            "",
            "- eager + FF chunking: diffusers' feed-forward chunking with one frame per chunk (SVD: "
            "`enable_forward_chunking()`; AnimateDiff: each transformer block's "
            "`set_chunk_feed_forward(1, dim)` with dim 0 for spatial and 1 for motion blocks, see "
            "`benchmarks/plan_table.py`); VAE decoders have "
            "no such option.",
            "- fxstream min: `fxstream.compile(budget_gb=None, target=\"cpu\")`; fxstream mid: a budget "
            "halfway "
            "between the min plan's predicted peak and its predicted eager baseline (weights included).",
            "- Step Rehash is measured on trained models in `rehash_cpu.md` (`benchmarks/rehash_cpu.py`), not here.",
            *(["- Threads: with 2 intra-op threads on this 2-core machine shared with other jobs, latencies "
               "were not reproducible (OpenMP threads spin-wait for preempted siblings: the same call varied "
               "up to 7x between two runs); with 1 thread they were stable to about 10%, hence --threads 1."]
              if args.threads == 1 else []),
            "",
            table,
            "",
            f"Total run time {time.perf_counter() - started:.0f} s.",
            *notes,
        ])
    print(tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True))
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
