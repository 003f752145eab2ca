"""Compiled-vs-eager latency on this CPU, interleaved so that load from other jobs hits both alike.

    python benchmarks/latency_cpu.py --model svd --size medium --threads 1 --pairs 4

Each pair runs eager then the compiled module (fxstream's lowest budget unless --budget-gb) on the same inputs;
the result is the ratio of the median times and the per-pair ratios. Writes benchmarks/results/latency_cpu.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxstream  # noqa: E402
from common import write_results  # noqa: E402
from fxstream.models import build  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="svd")
    parser.add_argument("--size", default="medium", choices=("tiny", "medium"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--budget-gb", type=float, default=None)
    parser.add_argument("--out", default="benchmarks/results/latency_cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    built = build(args.model, args.size)
    compiled = fxstream.compile(built.module, budget_gb=args.budget_gb, target="cpu")
    eager_times, compiled_times = [], []
    with torch.no_grad():
        start = time.perf_counter()
        compiled(*built.args, **built.kwargs)  # capture + plan + first run
        first = time.perf_counter() - start
        built.module(*built.args, **built.kwargs)  # warm-up
        for _ in range(args.pairs):
            for fn, times in ((built.module, eager_times), (compiled, compiled_times)):
                start = time.perf_counter()
                fn(*built.args, **built.kwargs)
                times.append(time.perf_counter() - start)
    ratio = statistics.median(compiled_times) / statistics.median(eager_times)
    plan = compiled.plan
    rows = [[f"{args.model} ({args.size})", "minimum" if args.budget_gb is None else f"{args.budget_gb:g} GiB",
             len(plan.sliced_groups), f"{statistics.median(eager_times):.2f}",
             f"{statistics.median(compiled_times):.2f}", f"{ratio:.2f}",
             " ".join(f"{c / e:.2f}" for e, c in zip(eager_times, compiled_times)), f"{first:.1f}"]]
    table = tabulate(rows, headers=["model", "budget", "groups sliced", "eager s (median)", "compiled s (median)",
                                    "ratio", "per-pair ratios", "first call s"], tablefmt="github")
    print(table)
    write_results(args.out, "fxstream compiled-vs-eager latency on CPU",
                  [f"{args.threads} thread(s), fp32, {args.pairs} interleaved pairs after a warm-up.", "", table])
    return 0


if __name__ == "__main__":
    sys.exit(main())
