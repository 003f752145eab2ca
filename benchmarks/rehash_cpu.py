"""Step Rehash at equal UNet FLOPs on the tiny trained reference models: four ways to choose the cut and the
schedule, at 1.5x, 1.8x and 2.0x fewer UNet FLOPs.

    python benchmarks/rehash_cpu.py --threads 1 --seeds 4

For each reference model (``fxstream.reference``), calibrate once (``fxstream.calibrate`` on three
generations, seeds the measurement does not use), then for each target speedup s (UNet FLOPs of a full generation over those with
rehash) compare, every method with the most full steps that still give at least s:

* fxstream auto: ``calibrate(..., speedup=s)``'s choice (the least error of the model's output reaching the
  final sample, validated on the calibration generations; ``--refine-runs N`` adds its local search);
* the paper's choice: the last temporal layer of the last up block (``rehash="auto"`` without calibration),
  Algorithm 1 on that feature's step-to-step similarity;
* DeepCache-style: the input of the last up block, a full step every N steps. Where no integer interval gives
  s, the two intervals around it are measured and PSNR is interpolated linearly in the FLOPs ratio (marked
  "interpolated"); where even the longest interval does not reach s, the row says so;
* evenly spaced full steps at the cut fxstream auto chose (the cut's effect apart from the schedule's).

Each method runs compiled by fxstream (a budget large enough that nothing is sliced) for ``--seeds`` seeds;
PSNR compares the final sample with the eager full-compute sample (values in [-1, 1], peak-to-peak 2). Time
is the wall-clock time spent inside the UNet calls, summed over the steps, runs interleaved per seed so that
load from other jobs hits all methods alike; the speedup is the eager UNet's median time over the method's.
Writes benchmarks/results/rehash_cpu.md and, for notebook 03, rehash_cpu.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxstream  # noqa: E402
from common import commit, machine, write_results  # noqa: E402
from fxstream import reference as ref  # noqa: E402
from fxstream.runtime.rehash import RehashConfig, Schedule  # noqa: E402

cal_mod = importlib.import_module("fxstream.calibrate")  # the module (fxstream.calibrate is its function)

STEPS = 25
SPEEDUPS = (1.5, 1.8, 2.0)
CALIBRATION_SEED = 100  # calibration seeds 100, 101, 102: not among the measured seeds (0, 1, ...)
CALIBRATION_GENERATIONS = 3  # one schedule's PSNR varies by 15 dB between seeds: one seed overfits
NO_SLICING_GB = 1024.0  # a budget every tiny model fits: compiled graphs run unsliced
NOISE_DB = 0.3  # the acceptance margin: differences below this are noise over 4 seeds


class Timed:
    """Wraps a UNet and sums the wall-clock time of its calls."""

    def __init__(self, unet):
        self.unet, self.seconds = unet, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.unet(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def deepcache_runs(cut, speedup: float, steps: int) -> tuple[list[tuple[Schedule, float]], str]:
    """The interval schedule(s) for a FLOPs speedup at the DeepCache cut: one interval that gives it exactly,
    or the two around it (PSNR interpolated); none when the longest interval does not reach it."""
    ratios = {}
    for every in range(1, steps):
        schedule = Schedule.interval(every, num_steps=steps)
        ratios[every] = (schedule, cut.flops_saved(steps, schedule.full_count(steps)))
    exact = [e for e, (_, r) in ratios.items() if abs(r - speedup) < 0.005]
    if exact:
        return [ratios[exact[0]]], f"every {exact[0]}"
    below = [e for e, (_, r) in ratios.items() if r < speedup]
    above = [e for e, (_, r) in ratios.items() if r > speedup]
    if not above:
        return [], f"n/a: the longest interval gives {max(r for _, r in ratios.values()):.2f}x"
    lo, hi = max(below, key=lambda e: ratios[e][1]), min(above, key=lambda e: ratios[e][1])
    return [ratios[lo], ratios[hi]], f"interpolated between every {lo} and every {hi}"


def run_model(name: str, seeds: int, speedups: tuple[float, ...], refine_runs: int = 0
              ) -> tuple[list[dict], list[str], dict]:
    model = ref.load(name)
    start = time.perf_counter()
    cal = fxstream.calibrate(
        model.unet, lambda u, i: model.sample(steps=STEPS, seed=CALIBRATION_SEED + i, unet=u),
        speedup=speedups[0], generations=CALIBRATION_GENERATIONS, refine_runs=refine_runs)
    cals = {speedups[0]: cal}
    for s in speedups[1:]:
        cals[s] = cal.choose(speedup=s, refine_runs=refine_runs)
    cal_seconds = time.perf_counter() - start
    # the paper's cut: what rehash="auto" caches without calibration (the temporal layer that skips the most)
    paper_unet = fxstream.compile(model.unet, NO_SLICING_GB, rehash=RehashConfig("auto", Schedule.interval(2)))
    model.sample(steps=2, seed=0, unet=paper_unet)
    paper_path = paper_unet.plan.rehash.cache_point
    deep = next(c for c in cal.candidates if c.path == _deepcache_path(cal))
    compiled = {paper_path: paper_unet}

    def unet_for(path: str):
        if path not in compiled:
            compiled[path] = fxstream.compile(model.unet, NO_SLICING_GB,
                                              rehash=RehashConfig(path, Schedule.interval(2)))
            model.sample(steps=2, seed=0, unet=compiled[path])  # compile outside the timed runs
        return compiled[path]

    # runs: (target, method) -> list of (path, schedule); methods with two runs are interpolated
    runs, notes = {}, {}
    for s in speedups:
        c = cals[s]
        runs[(s, "fxstream auto")] = [(c.chosen.cut.path, c.chosen.schedule, c.chosen.flops_ratio)]
        notes[(s, "fxstream auto")] = c.chosen.method
        try:
            paper = c.option(paper_path, cal_mod.ALGORITHM1_FEATURE)
            runs[(s, "paper (last temporal layer, Algorithm 1)")] = [(paper_path, paper.schedule, paper.flops_ratio)]
            notes[(s, "paper (last temporal layer, Algorithm 1)")] = ""
        except KeyError:
            notes[(s, "paper (last temporal layer, Algorithm 1)")] = "n/a: the cut does not reach it"
            runs[(s, "paper (last temporal layer, Algorithm 1)")] = []
        dc, note = deepcache_runs(deep, s, STEPS)
        runs[(s, "DeepCache-style")] = [(deep.path, sch, r) for sch, r in dc]
        notes[(s, "DeepCache-style")] = note
        uni = c.option(c.chosen.cut.path, cal_mod.UNIFORM)
        runs[(s, "evenly spaced at auto's cut")] = [(uni.cut.path, uni.schedule, uni.flops_ratio)]
        notes[(s, "evenly spaced at auto's cut")] = ""
    for parts in runs.values():
        for path, _, _ in parts:
            unet_for(path)
    eager_times, psnrs, times = [], {}, {}
    baseline = fxstream.compile(model.unet, NO_SLICING_GB)
    model.sample(steps=2, seed=0, unet=baseline)
    base_times = []
    for seed in range(seeds):
        timed = Timed(model.unet)
        full = model.sample(steps=STEPS, seed=seed, unet=timed)
        eager_times.append(timed.seconds)
        timed = Timed(baseline)
        model.sample(steps=STEPS, seed=seed, unet=timed)
        base_times.append(timed.seconds)
        for key, parts in runs.items():
            for k, (path, schedule, _) in enumerate(parts):
                unet = compiled[path]
                unet.rehash.set_schedule(schedule)
                timed = Timed(unet)
                video = model.sample(steps=STEPS, seed=seed, unet=timed)
                psnrs.setdefault((key, k), []).append(ref.psnr(video, full))
                times.setdefault((key, k), []).append(timed.seconds)
    eager_t = statistics.median(eager_times)
    rows = [dict(model=name, target="-", method="full compute (eager)", cut="-", schedule=f"{STEPS} of {STEPS} full",
                 flops_ratio="1.00", speedup="1.00x", psnr_mean="inf", psnr_min="inf", note=""),
            dict(model=name, target="-", method="full compute (compiled, no rehash)", cut="-",
                 schedule=f"{STEPS} of {STEPS} full", flops_ratio="1.00",
                 speedup=f"{eager_t / statistics.median(base_times):.2f}x", psnr_mean="-", psnr_min="-", note="")]
    points = []
    for (s, method), parts in runs.items():
        if not parts:
            rows.append(dict(model=name, target=f"{s:.1f}x", method=method, cut="-", schedule="-", flops_ratio="-",
                             speedup="-", psnr_mean="-", psnr_min="-", note=notes[(s, method)]))
            continue
        per = []
        for k, (path, schedule, ratio) in enumerate(parts):
            p = psnrs[((s, method), k)]
            per.append((ratio, statistics.mean(p), min(p), eager_t / statistics.median(times[((s, method), k)])))
        if len(per) == 2:  # interpolate PSNR and speedup linearly in the FLOPs ratio, at s
            (r0, m0, n0, t0), (r1, m1, n1, t1) = per
            w = (s - r0) / (r1 - r0)
            ratio, mean, least, speed = s, m0 + w * (m1 - m0), n0 + w * (n1 - n0), t0 + w * (t1 - t0)
            schedule_text = " / ".join(sch.describe(STEPS) for _, sch, _ in parts)
        else:
            ratio, mean, least, speed = per[0]
            schedule_text = parts[0][1].describe(STEPS)
        rows.append(dict(model=name, target=f"{s:.1f}x", method=method, cut=parts[0][0], schedule=schedule_text,
                         flops_ratio=f"{ratio:.2f}", speedup=f"{speed:.2f}x", psnr_mean=f"{mean:.2f}",
                         psnr_min=f"{least:.2f}", note=notes[(s, method)]))
        points.append(dict(model=name, target=s, method=method, flops_ratio=ratio, psnr=mean, speedup=speed))
    sections = [f"## {name}: calibration", "",
                f"Calibrated once on seeds {CALIBRATION_SEED}-{CALIBRATION_SEED + CALIBRATION_GENERATIONS - 1} "
                f"in {cal_seconds:.0f} s (the first target's "
                f"calibration {cal.seconds:.0f} s: UNet calls " + ", ".join(f"{v} {k}" for k, v in
                                                                             cal.unet_calls.items()) +
                "; each further target only validates). One table per target: every cut's best option, and why "
                "it lost.", ""]
    for s in speedups:
        sections += [f"### {s:.1f}x", "", "```", cals[s].table(), "```", ""]
    return rows, sections, dict(points=points, calibration_seconds=cal_seconds)


def _deepcache_path(cal) -> str:
    """The DeepCache cut's path: the up block before the last (``passes.rehash.deepcache_point``)."""
    blocks = sorted({c.path.split(".")[1] for c in cal.candidates if c.path.startswith("up_blocks.")}, key=int)
    return f"up_blocks.{int(blocks[-1]) - 1}"


def verdicts(rows: list[dict], speedups: tuple[float, ...]) -> list[str]:
    """The acceptance check, per model and target: auto's PSNR against every other method's."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for s in speedups:
            here = [r for r in rows if r["model"] == name and r["target"] == f"{s:.1f}x" and r["psnr_mean"] != "-"]
            auto = next((float(r["psnr_mean"]) for r in here if r["method"] == "fxstream auto"), None)
            if auto is None:
                continue
            others = {r["method"]: float(r["psnr_mean"]) for r in here if r["method"] != "fxstream auto"}
            best_other = max(others.values(), default=float("-inf"))
            ok = auto >= best_other - NOISE_DB
            out.append(f"- {name} {s:.1f}x: fxstream auto {auto:.2f} dB; best other {best_other:.2f} dB "
                       f"({max(others, key=others.get) if others else '-'}): "
                       f"{'auto is best (within ' + str(NOISE_DB) + ' dB)' if ok else 'auto LOSES'}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ref.NAMES), choices=ref.NAMES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--speedups", nargs="+", type=float, default=list(SPEEDUPS))
    parser.add_argument("--refine-runs", type=int, default=0,
                        help="calibrate(refine_runs=): local-search runs after validation (default: none)")
    parser.add_argument("--out", default="benchmarks/results/rehash_cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    speedups = tuple(args.speedups)
    all_rows, sections, points, cal_seconds = [], [], [], {}
    for name in args.models:
        rows, more, info = run_model(name, args.seeds, speedups, args.refine_runs)
        all_rows += rows
        sections += more
        points += info["points"]
        cal_seconds[name] = info["calibration_seconds"]
        print(tabulate(rows, headers="keys", tablefmt="github"), flush=True)
    table = tabulate(all_rows, headers="keys", tablefmt="github")
    checks = verdicts(all_rows, speedups)
    print(table)
    print("\n".join(checks))
    write_results(args.out, "Step Rehash at equal UNet FLOPs on the tiny trained reference models (CPU)", [
        f"{STEPS} sampling steps; {args.seeds} seeds (mean and min PSNR of the final sample against eager full "
        "compute; median UNet time). Target: UNet FLOPs of a full generation over those with rehash; each method "
        "takes the most full steps that still reach it (flops_ratio: what it reached). speedup: measured UNet "
        "wall-clock time on this CPU, eager over the method.", "", table, "", "Against the acceptance "
        f"(fxstream auto >= every other method within {NOISE_DB} dB):", "", *checks, "", *sections])
    json_path = Path(args.out).with_suffix(".json")
    json_path.write_text(json.dumps(dict(command="python " + " ".join(sys.argv), commit=commit(),
                                         machine=machine(), seeds=args.seeds, steps=STEPS, points=points,
                                         calibration_seconds=cal_seconds), indent=1) + "\n")
    print(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
