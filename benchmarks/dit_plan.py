"""Predicted activation memory of one call of the full-size video transformers: eager vs fxstream's minimum.

    python benchmarks/dit_plan.py                       # every model; writes benchmarks/results/dit_plan.md
    python benchmarks/dit_plan.py --models wan2.1-14b --layers 2 --out /tmp/dit_plan.md   # 2 blocks of each list
    python benchmarks/dit_plan.py --medium              # measured on this CPU, medium configs: dit_medium_cpu.md

Predictions of ``passes/memory.py`` on the model zoo's full-size transformers (the checkpoints'
``transformer/config.json``, :mod:`fxstream.models`) built on the ``meta`` device (no weights, no GPU): bf16,
target CUDA (flash / memory-efficient SDPA), called as their pipelines call them at the pipelines' default sizes
(batch 2 where the pipeline batches the guidance branches: LTX-Video, CogVideoX, Mochi; Wan and HunyuanVideo
run one branch a call). Activations only:
the weights are resident either way. ``--layers`` builds fewer blocks (same widths, same tokens) for a quick
look; the table says how many ran. Plan time is the wall time of ``fxstream.plan`` (capture included) here,
with the plan cache off.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ["FXSTREAM_PLAN_CACHE"] = "0"  # plan every time: the plan time is part of the table
import fxstream  # noqa: E402
from common import gib, write_results  # noqa: E402

DTYPE = torch.bfloat16
MODELS = [n for n, spec in fxstream.models.ZOO.items() if spec.family == "transformer"]
# the ModuleLists of blocks per class (``--layers`` keeps the first n of each)
_BLOCKS = ("blocks", "transformer_blocks", "single_transformer_blocks")


def video_tokens(m) -> int:
    """Tokens of the video in one sequence: latent positions over the patch volume."""
    config, x = m.module.config, m.kwargs["hidden_states"]
    patch = config.patch_size
    volume = math.prod(patch) if isinstance(patch, (tuple, list)) else patch * patch * (config.get("patch_size_t") or 1)
    return x.numel() // (x.shape[0] * config.in_channels * volume)


def run(name: str, layers: int | None) -> list:
    m = fxstream.models.build(name, "full", dtype=DTYPE)  # the zoo's: the released config, the pipeline's call
    full_layers = sum(len(getattr(m.module, a)) for a in _BLOCKS if hasattr(m.module, a))
    if layers is not None:
        for a in _BLOCKS:
            if hasattr(m.module, a):
                setattr(m.module, a, getattr(m.module, a)[:layers])
    blocks = sum(len(getattr(m.module, a)) for a in _BLOCKS if hasattr(m.module, a))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = fxstream.plan(m.module, *m.args, target="cuda", **m.kwargs)
    seconds = time.perf_counter() - start
    eager, low = plan.baseline_activation_peak_bytes, plan.predicted_activation_peak_bytes
    return [name, f"{m.frames} x {m.height}x{m.width}", video_tokens(m), m.kwargs["hidden_states"].shape[0],
            "all" if blocks == full_layers else f"{blocks} of {full_layers}", gib(eager), gib(low),
            f"{100 * low / eager:.0f}%", len(plan.sliced_groups),
            sum(1 for g in plan.groups if g.kind == "keys"),
            f"{plan.predicted_slowdown:.2f}x" if plan.predicted_slowdown else "-", f"{seconds:.0f}",
            f"{plan.peak_node} in {plan.peak_module_path or '<top level>'}"]


HEADERS = ["model", "frames x size", "video tokens", "batch", "blocks", "eager act. GiB", "fxstream min act. GiB",
           "min / eager", "sliced groups", "key-chunked attentions", "time vs eager (predicted)", "plan s",
           "bounded at"]


def measure_medium(name: str) -> list:
    """Medium config on this CPU (fp32, one thread): measured activation peaks of one call, eager and at the minimum,
    the prediction, the error against eager and the time of a call (median of 3, interleaved)."""
    torch.set_num_threads(1)
    m = fxstream.models.build(name, "medium")
    out = (lambda o: o.sample if hasattr(o, "sample") else o[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = fxstream.measure(m.module, *m.args, **m.kwargs)
        compiled = fxstream.compile(m.module)
        compiled(*m.args, **m.kwargs)
        got = fxstream.measure(compiled, *m.args, **m.kwargs)
        times: dict[str, list[float]] = {"eager": [], "min": []}
        for _ in range(3):
            for label, f in (("eager", m.module), ("min", compiled)):
                start = time.perf_counter()
                f(*m.args, **m.kwargs)
                times[label].append(time.perf_counter() - start)
    ref = out(eager.output)
    err = float((out(got.output) - ref).abs().max()) / float(ref.abs().max())
    predicted = compiled.plan.predicted_activation_peak_bytes
    e, g = eager.activation_peak_bytes, got.activation_peak_bytes
    te, tm = sorted(times["eager"])[1], sorted(times["min"])[1]
    return [name, f"{m.frames} x {m.height}x{m.width}", video_tokens(m), f"{e / 2**20:.2f}", f"{g / 2**20:.2f}",
            f"{100 * g / e:.0f}%", f"{100 * (g / predicted - 1):+.1f}%", f"{err:.1e}", f"{tm / te:.2f}x"]


MEDIUM_HEADERS = ["model", "frames x size", "video tokens", "eager MiB", "fxstream min MiB", "min / eager",
                  "vs predicted", "max rel. error", "time vs eager"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--layers", type=int, default=None, help="build this many blocks (default: all)")
    parser.add_argument("--medium", action="store_true",
                        help="measure the medium configs on this CPU instead (writes dit_medium_cpu.md)")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/dit_plan.md, or "
                        "dit_medium_cpu.md with --medium)")
    args = parser.parse_args(argv)
    results = Path(__file__).parent / "results"
    if args.medium:
        rows = [measure_medium(name) for name in args.models.split(",")]
        table = tabulate(rows, MEDIUM_HEADERS, tablefmt="github")
        print(table)
        write_results(args.out or results / "dit_medium_cpu.md",
                      "Medium video transformers on this CPU: measured activation peak of one call, eager vs fxstream",
                      ["fp32, one thread, fxstream.measure; the minimum-memory plan (fxstream.compile with no budget); "
                       "time: median of 3 calls each, interleaved. See benchmarks/dit_plan.py.", "", table])
        return
    args.out = args.out or results / "dit_plan.md"
    rows = []
    for name in args.models.split(","):
        rows.append(run(name, args.layers))
        print(tabulate([rows[-1]], HEADERS), flush=True)
    table = tabulate(rows, HEADERS, tablefmt="github")
    print(table)
    write_results(args.out, "Full-size video transformers: predicted activation peak of one call, eager vs fxstream",
                  ["Predicted on meta (bf16, target CUDA, the pipelines' call); see benchmarks/dit_plan.py.", "",
                   table])


if __name__ == "__main__":
    main()
