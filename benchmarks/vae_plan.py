"""Predicted activation memory of one full-size video VAE decode: eager vs fxstream's minimum.

    python benchmarks/vae_plan.py                          # every VAE; writes benchmarks/results/vae_plan.md
    python benchmarks/vae_plan.py --models cogvideox,mochi --out /tmp/vae_plan.md
    python benchmarks/vae_plan.py --models none            # the tiny decodes only
    python benchmarks/vae_plan.py --tiny none --models wan2.1 --out /tmp/wan.md

Two tables. Measured on this CPU: the zoo's tiny random-weight configs (fp32), eager and
fxstream at the minimum, through ``fxstream.measure`` (live storage), with the plan's prediction and the error
against eager's decode. Predicted at full size:

Predictions of ``passes/memory.py`` for each VAE's own ``decode`` (every tiling / framewise / frame-batch switch
off where the class has one: one decode of the whole latent), the zoo's full-size entries (``fxstream.models``:
the released configs) on the ``meta`` device (no weights, no GPU): bf16, target CUDA, batch 1, at the pipelines'
default sizes. Activations only: the weights are resident either way. Plan time is the wall time of
``fxstream.plan`` (capture included) here, with the plan cache off.
"""

from __future__ import annotations

import argparse
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
from fxstream import models  # noqa: E402
from common import gib, write_results  # noqa: E402

DTYPE = torch.bfloat16
# table name: zoo entry (fxstream.models), at the pipelines' default sizes
MODELS = {
    "wan2.1": "wan-vae-decoder",
    "ltx-video": "ltx-vae-decoder",
    "cogvideox": "cogvideox-vae-decoder",
    "mochi": "mochi-vae-decoder",
    "hunyuanvideo": "hunyuanvideo-vae-decoder",
}


def run(name: str) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = models.build(MODELS[name], "full", dtype=DTYPE)
    module, z, frames, height, width = built.module, built.args[0], built.frames, built.height, built.width
    start = time.perf_counter()
    plan = fxstream.plan(module, z, target="cuda")
    seconds = time.perf_counter() - start
    eager, low = plan.baseline_activation_peak_bytes, plan.predicted_activation_peak_bytes
    streamed = [g for g in plan.groups if g.kind == "rows" and g.slices > 1]
    return [name, f"{frames} x {height}x{width}", tuple(z.shape), gib(eager), gib(low), f"{100 * low / eager:.0f}%",
            len(streamed), len(plan.sliced_groups) - len(streamed), f"{seconds:.0f}",
            f"{plan.peak_node} in {plan.peak_module_path or '<top level>'}"]


TINY = ["wan-vae-decoder", "ltx-vae-decoder", "cogvideox-vae-decoder", "mochi-vae-decoder", "hunyuanvideo-vae-decoder"]
TINY_HEADERS = ["tiny VAE decode", "output", "eager KiB", "fxstream min KiB", "predicted KiB", "min / eager",
                "max rel. error", "row-streamed segments (bands)"]


def run_tiny(name: str) -> list:
    built = models.build(name, "tiny")
    torch.set_num_threads(1)
    with torch.no_grad():
        eager = fxstream.measure(built.module, *built.args)
        compiled = fxstream.compile(built.module)
        compiled(*built.args)
        got = fxstream.measure(compiled, *built.args)
    ref, out = eager.output, got.output
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    plan = compiled.plan
    streamed = [g.slices for g in plan.groups if g.kind == "rows" and g.slices > 1]
    return [name, tuple(ref.shape), f"{eager.activation_peak_bytes / 1024:.1f}",
            f"{got.activation_peak_bytes / 1024:.1f}", f"{plan.predicted_activation_peak_bytes / 1024:.1f}",
            f"{100 * got.activation_peak_bytes / eager.activation_peak_bytes:.0f}%", f"{err:.1e}",
            ", ".join(map(str, streamed)) or "-"]


HEADERS = ["VAE decode", "frames x size", "latent", "eager act. GiB", "fxstream min act. GiB", "min / eager",
           "row-streamed segments", "sliced groups", "plan s", "bounded at"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "vae_plan.md"))
    parser.add_argument("--tiny", default=",".join(TINY), help="tiny decodes measured here, comma-separated "
                        "(none: skip): " + ", ".join(TINY))
    args = parser.parse_args(argv)
    tiny = [run_tiny(name) for name in args.tiny.split(",") if name in TINY]
    tiny_table = tabulate(tiny, TINY_HEADERS, tablefmt="github")
    print(tiny_table, flush=True)
    rows = []
    for name in args.models.split(","):
        if name in MODELS:
            rows.append(run(name))
            print(tabulate([rows[-1]], HEADERS), flush=True)
    table = tabulate(rows, HEADERS, tablefmt="github")
    print(table)
    write_results(args.out, "DiT-era video VAE decodes: activation peak, eager vs fxstream",
                  ["Measured on this CPU: the zoo's tiny configs (fp32), fxstream at the minimum.", "",
                   tiny_table, "",
                   "Predicted on meta (bf16, target CUDA, batch 1, one decode of the whole latent); see "
                   "benchmarks/vae_plan.py.", "", table])


if __name__ == "__main__":
    main()
