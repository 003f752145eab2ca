"""What faithfulness costs per call: the guard's check, and a compiled module that slices nothing, vs eager.

    python benchmarks/guards_cpu.py --pairs 6

1. Guard cost: :func:`fxstream.guards.changed` on each zoo model (full size on meta: the real module trees, no
   weights), median of repeated checks. Every call of a compiled module pays it once.
2. Nothing sliced: the tiny and medium SVD UNets compiled with a budget eager fits (the plan slices nothing, so calls run
   the original module behind the guard), timed against eager in interleaved pairs (each first in half of
   them); the ratio of medians.

Writes benchmarks/results/guards_cpu.md.
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
from fxstream import guards, models  # noqa: E402

GUARD_MODELS = ("svd", "animatediff", "modelscope", "svd-vae-decoder", "sd-vae-decoder")


def guard_rows(repeats: int) -> list[list]:
    rows = []
    for name in GUARD_MODELS:
        module = models.build(name, "full", device="meta").module
        before = guards.fingerprint(module)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            assert guards.changed(module, before) is None
            times.append(time.perf_counter() - start)
        rows.append([f"{name} (full, meta)", sum(1 for _ in module.modules()), len(before.items),
                     f"{statistics.median(times) * 1e3:.2f}"])
    return rows


def unsliced_row(size: str, pairs: int) -> tuple[list, bool]:
    built = models.build("svd", size)
    compiled = fxstream.compile(built.module, budget_gb=64, target="cpu")
    eager_times, compiled_times = [], []
    with torch.no_grad():
        start = time.perf_counter()
        out = compiled(*built.args, **built.kwargs)
        first = time.perf_counter() - start
        equal = torch.equal(out.sample, built.module(*built.args, **built.kwargs).sample)
        for i in range(pairs):
            order = [(built.module, eager_times), (compiled, compiled_times)]
            for fn, times in order if i % 2 == 0 else order[::-1]:  # each goes first in half the pairs
                start = time.perf_counter()
                fn(*built.args, **built.kwargs)
                times.append(time.perf_counter() - start)
    ratio = statistics.median(compiled_times) / statistics.median(eager_times)
    row = [f"svd ({size}), budget 64 GiB", pairs, len(compiled.plan.sliced_groups), compiled.compiled.runs_original,
           equal, f"{statistics.median(eager_times):.3f}", f"{statistics.median(compiled_times):.3f}",
           f"{ratio:.3f}", " ".join(f"{c / e:.3f}" for e, c in zip(eager_times, compiled_times)), f"{first:.1f}"]
    return row, equal


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=6, help="interleaved pairs for the medium UNet")
    parser.add_argument("--tiny-pairs", type=int, default=40, help="interleaved pairs for the tiny UNet")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/guards_cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    guard = tabulate(guard_rows(args.repeats), headers=["model", "modules", "items read", "guard ms per call"],
                     tablefmt="github")
    rows, equal = [], True
    for size, pairs in (("tiny", args.tiny_pairs), ("medium", args.pairs)):
        row, same = unsliced_row(size, pairs)
        rows.append(row)
        equal = equal and same
    for row in rows:
        if row[1] > 12:  # keep the table readable: the per-pair column of a long run as its range
            ratios = [float(r) for r in row[8].split()]
            row[8] = f"{min(ratios):.3f}-{max(ratios):.3f}"
    unsliced = tabulate(rows, headers=["model", "pairs", "groups sliced", "runs original", "torch.equal eager",
                                        "eager s (median)", "compiled s (median)", "ratio", "per-pair ratios",
                                        "first call s"], tablefmt="github")
    print(guard, "", unsliced, sep="\n")
    write_results(args.out, "fxstream: the guard's cost per call, and a compiled module that slices nothing", [
        "## Guard check per call (median)", "", guard, "",
        f"## Nothing sliced: compiled vs eager ({args.threads} thread(s), fp32, interleaved pairs)",
        "", unsliced])
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
