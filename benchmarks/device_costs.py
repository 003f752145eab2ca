"""Measure the time model's op costs on this machine and write the table the planner ships for its device kind.

    python benchmarks/device_costs.py --threads 1                  # writes passes/costs_cpu.json (this CPU)
    python benchmarks/device_costs.py --device cuda                # writes passes/costs_cuda.json (a GPU)
    python benchmarks/device_costs.py --out /tmp/costs.json        # anywhere else

``fxstream.timing.measure_costs``: dispatch costs on tiny tensors, then every node of the calibration models
(the zoo's ``--models`` at ``--size``, random weights) timed alone, large ones on a band of rows too, and each
op class's, op's and size's rate fitted over its nodes. ``benchmarks/cpu.py`` then sets predictions beside
measured calls: its eager rows test the fit, its plans (bands, slices, recomputed passes) what the calibration
never ran. Also writes ``benchmarks/results/device_costs_<kind>.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from fxstream.timing import CALIBRATION_MODELS, measure_costs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(CALIBRATION_MODELS))
    parser.add_argument("--size", default="medium")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default: passes/costs_<kind>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        costs = measure_costs(args.device, [m.strip() for m in args.models.split(",") if m.strip()],
                              size=args.size, repeats=args.repeats, progress=log)
    out = Path(args.out) if args.out else ROOT / "passes" / f"costs_{costs.kind}.json"
    costs.to_json(out)
    rows = [[k, f"{v / 1e9:.2f} GFLOP/s", costs.details["nodes"].get(k, {}).get("nodes", 0)]
            for k, v in costs.flops_per_s.items()]
    rows += [[k, f"{v / 1e9:.2f} GB/s", costs.details["nodes"].get(k, {}).get("nodes", 0)]
             for k, v in costs.bytes_per_s.items()]
    rows += [[f"{op} (own rate)", f"{v / 1e9:.2f} G{'FLOP' if op.startswith('conv') else 'B'}/s", "-"]
             for op, v in sorted(costs.by_op.items()) if op.startswith(("conv2d/", "conv3d/"))]
    rows += [["op dispatch (generated graph)", f"{costs.op_s * 1e6:.1f} us", "-"],
             ["band-program instruction", f"{costs.loop_s * 1e6:.1f} us", "-"],
             ["slice loop step", f"{costs.call_s * 1e6:.1f} us", "-"]]
    table = tabulate(rows, headers=["class", "rate", "nodes fitted"], tablefmt="github", disable_numparse=True)
    write_results(ROOT / "benchmarks" / "results" / f"device_costs_{costs.kind}.md",
                  f"Time model: op costs measured on this {costs.kind}", [
                      f"Written to `{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}`. {costs.source}.",
                      "Rates: each class's FLOPs (conv, matmul, attention) or bytes read and written (norm, copy, "
                      "pointwise) summed over its nodes, over their measured time less one dispatch each.", "",
                      table, "", f"Total run time {time.perf_counter() - started:.0f} s."])
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
