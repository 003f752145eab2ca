"""fxstream with ``backend="inductor"`` on this CPU: time vs eager, vs fxstream's eager graph, vs plain torch.compile.

    python benchmarks/inductor_cpu.py --model svd --size medium --pairs 3

For one zoo model at a middle budget (halfway between fxstream's floor and eager's predicted peak): first-call
time (capture, plan and, for Inductor, compiling every slice body) and the median of interleaved timed calls of
eager, the planned graph run eager, the planned graph with its slice bodies compiled by Inductor, and plain
``torch.compile`` of the module (``--no-torch-compile`` to skip it). Outputs are compared with eager (max
relative error). Writes benchmarks/results/inductor_cpu.md.

Memory: the extra resident memory at the peak of one call, read from the kernel (``VmHWM``, reset before the
call; large blocks mmapped so that freed memory leaves the resident set), beside fxstream.measure's dispatch-
level count (which cannot see inside compiled kernels) and the plan's predicted activation peak.
"""

from __future__ import annotations

import argparse
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
from common import PEAK_RSS_ENV, peak_rss_bytes, write_results  # noqa: E402
from fxstream.measure import measure  # noqa: E402
from fxstream.models import build  # noqa: E402
from passes.memory import format_bytes  # noqa: E402


def _sample(out):
    return out if isinstance(out, torch.Tensor) else out.sample if hasattr(out, "sample") else out[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="svd")
    parser.add_argument("--size", default="medium", choices=("tiny", "medium"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/inductor_cpu.md")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in PEAK_RSS_ENV.items()):  # the allocator reads it at start-up
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PEAK_RSS_ENV})
    torch.set_num_threads(args.threads)
    built = build(args.model, args.size)
    module = built.module
    floor = fxstream.plan(module, *built.args, target="cpu", **built.kwargs)
    budget = (floor.predicted_peak_bytes + floor.baseline_peak_bytes) / 2
    variants = {"eager": module}
    variants["fxstream"] = fxstream.compile(module, budget_gb=budget / 2**30, target="cpu")
    variants["fxstream + inductor"] = fxstream.compile(module, budget_gb=budget / 2**30, target="cpu",
                                                       backend="inductor")
    if not args.no_torch_compile:
        variants["torch.compile"] = torch.compile(module)
    first, times, errors = {}, {name: [] for name in variants}, {}
    with torch.no_grad():
        ref = _sample(module(*built.args, **built.kwargs))
        for name, fn in variants.items():
            start = time.perf_counter()
            out = _sample(fn(*built.args, **built.kwargs))
            first[name] = time.perf_counter() - start
            errors[name] = ((out - ref).abs().max() / ref.abs().max()).item()
            print(f"{name}: first call {first[name]:.1f} s, max rel error {errors[name]:.2e}", flush=True)
        for _ in range(args.pairs):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn(*built.args, **built.kwargs)
                times[name].append(time.perf_counter() - start)
        rss = {name: min(peak_rss_bytes(lambda fn=fn: fn(*built.args, **built.kwargs)) for _ in range(2))
               for name, fn in variants.items()}
        counted = {name: measure(fn, *built.args, **built.kwargs).activation_peak_bytes
                   for name, fn in variants.items() if name in ("eager", "fxstream")}
    eager = statistics.median(times["eager"])
    plan = variants["fxstream"].plan
    predicted = {"eager": plan.baseline_activation_peak_bytes, "fxstream": plan.predicted_activation_peak_bytes,
                 "fxstream + inductor": plan.predicted_activation_peak_bytes}
    rows = []
    for name in variants:
        median = statistics.median(times[name])
        pred = predicted.get(name)
        rows.append([name, f"{first[name]:.1f}", f"{median:.3f}", f"{median / eager:.2f}", f"{errors[name]:.1e}",
                     format_bytes(rss[name]), format_bytes(counted[name]) if name in counted else "-",
                     format_bytes(pred) if pred else "-", f"{rss[name] / pred:.2f}" if pred else "-"])
    table = tabulate(rows, headers=["variant", "first call s", "median s", "vs eager", "max rel error",
                                    "peak RSS extra", "counted peak", "predicted peak", "RSS / predicted"],
                     tablefmt="github")
    head = (f"{args.model} ({args.size}), budget {format_bytes(int(budget))} (floor "
            f"{format_bytes(floor.predicted_peak_bytes)}, eager {format_bytes(floor.baseline_peak_bytes)}); plan: "
            f"{len(plan.sliced_groups)} groups sliced, predicted peak {format_bytes(plan.predicted_peak_bytes)}")
    print(head, table, sep="\n")
    write_results(args.out, "fxstream with backend=\"inductor\" on CPU", [
        f"{args.threads} thread(s), fp32, {args.pairs} interleaved rounds after the first calls.", "", head, "",
        table])
    return 0


if __name__ == "__main__":
    sys.exit(main())
