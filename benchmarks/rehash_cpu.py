"""Step Rehash on the tiny trained reference models: UNet speed, FLOPs and fidelity at 13 of 25 full steps.

    python benchmarks/rehash_cpu.py --threads 1 --seeds 4

For each reference model (``fxstream.reference``): calibrate once (seed 0, ``fxstream.calibrate``), then for
every seed generate 25 steps four ways, all with the same noise and conditioning:

* full: the eager UNet at every step (the reference video), and the compiled UNet without rehash (what the
  compiled graph saves by itself, included in the rehash rows' speedups);
* rehash: fxstream-compiled (budget large enough that nothing is sliced) with the calibrated cache point and
  Algorithm 1 schedule (13 full steps);
* deepcache-style: the same machinery cut at the input of the last up block, every other step full (13);
* rehash, interval: the calibrated cache point with DeepCache's uniform schedule (13), to separate the effect
  of the cut from that of the schedule.

Timing is the wall-clock time spent inside the UNet calls (the sampler's own work is excluded), summed over
the 25 steps; runs are interleaved per seed so that load from other jobs hits all methods alike, and the
table reports the median over seeds. FLOPs are counted by torch's FlopCounterMode around each UNet call.
PSNR compares the final sample with the full-compute sample (values in [-1, 1], peak-to-peak 2).
Writes benchmarks/results/rehash_cpu.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxstream  # noqa: E402
from common import write_results  # noqa: E402
from fxstream import reference as ref  # noqa: E402
from fxstream.runtime.rehash import RehashConfig, Schedule  # noqa: E402

STEPS = 25
FULL = 13
NO_SLICING_GB = 1024.0  # a budget every tiny model fits: compiled graphs run unsliced


class Timed:
    """Wraps a UNet: sums the wall-clock time and (optionally) the FLOPs of its calls."""

    def __init__(self, unet, count_flops: bool = False):
        self.unet, self.count_flops = unet, count_flops
        self.seconds, self.flops = 0.0, 0

    def __call__(self, *args, **kwargs):
        if self.count_flops:
            with FlopCounterMode(display=False) as counter:
                out = self.unet(*args, **kwargs)
            self.flops += counter.get_total_flops()
            return out
        start = time.perf_counter()
        out = self.unet(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def run_model(name: str, seeds: int) -> tuple[list[dict], dict]:
    model = ref.load(name)
    cal = fxstream.calibrate(model.unet, lambda u: model.sample(steps=STEPS, seed=0, unet=u), full_steps=FULL)
    methods = {
        "full (eager)": None,
        "full (compiled, no rehash)": "off",
        "rehash (calibrated)": cal.config,
        "deepcache-style": RehashConfig("deepcache", Schedule.interval(2)),
        "rehash, interval 2": RehashConfig(cal.recommended.path, Schedule.interval(2)),
    }
    unets = {k: model.unet if c is None else fxstream.compile(model.unet, NO_SLICING_GB,
                                                              rehash=None if c == "off" else c)
             for k, c in methods.items()}
    # compile and warm up outside the timed runs; FLOPs from one counted run per method
    flops, full_counts = {}, {}
    for k, u in unets.items():
        counted = Timed(u, count_flops=True)
        model.sample(steps=STEPS, seed=0, unet=counted)
        flops[k] = counted.flops
        full_counts[k] = len(u.rehash.full_steps_run) if getattr(u, "rehash", None) is not None else STEPS
    times = {k: [] for k in unets}
    psnrs = {k: [] for k in unets}
    for seed in range(seeds):
        videos = {}
        for k, u in unets.items():
            timed = Timed(u)
            videos[k] = model.sample(steps=STEPS, seed=seed, unet=timed)
            times[k].append(timed.seconds)
        for k in unets:
            psnrs[k].append(ref.psnr(videos[k], videos["full (eager)"]))
    base_t = statistics.median(times["full (eager)"])
    rows = []
    for k in unets:
        t = statistics.median(times[k])
        finite = [p for p in psnrs[k] if p != float("inf")]
        rows.append({
            "model": name,
            "method": k,
            "cache point": "-" if methods[k] in (None, "off") else (
                cal.recommended.path if methods[k].cache_point != "deepcache" else
                unets[k].plan.rehash.cache_point + " (input of last up block)"),
            "full steps": f"{full_counts[k]}/{STEPS}",
            "UNet s (median)": f"{t:.3f}",
            "speedup": f"{base_t / t:.2f}x",
            "FLOPs full/this": f"{flops['full (eager)'] / flops[k]:.2f}",
            "PSNR vs full (mean dB)": "inf" if not finite else f"{statistics.mean(finite):.2f}",
            "PSNR min": "inf" if not finite else f"{min(finite):.2f}",
        })
    info = dict(name=name, schedule=cal.schedule.describe(STEPS), gamma=cal.schedule.gamma,
                table=cal.table(), steps_per_s=None)
    return rows, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ref.NAMES), choices=ref.NAMES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/rehash_cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    all_rows, sections = [], []
    for name in args.models:
        rows, info = run_model(name, args.seeds)
        all_rows += rows
        sections += [f"## {name}: calibration", "", f"Schedule (Algorithm 1): {info['schedule']}, "
                     f"threshold {info['gamma']}", "", info["table"], ""]
        print(tabulate(rows, headers="keys", tablefmt="github"), flush=True)
    table = tabulate(all_rows, headers="keys", tablefmt="github")
    print(table)
    write_results(args.out, "Step Rehash on the tiny trained reference models (CPU)", [
        f"{STEPS} sampling steps, {FULL} of them full for every rehash method; {args.seeds} seeds (median time, "
        "mean and min PSNR); UNet time only. Speedup and FLOPs are relative to the eager UNet at every step.",
        "", table, "", *sections])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
