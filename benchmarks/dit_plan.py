"""Predicted activation memory of one call of the full-size video transformers: eager vs fxstream's minimum.

    python benchmarks/dit_plan.py                       # every model; writes benchmarks/results/dit_plan.md
    python benchmarks/dit_plan.py --models wan2.1-14b --layers 2 --out /tmp/dit_plan.md   # 2 blocks of each list

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
            f"{100 * low / eager:.0f}%", len(plan.sliced_groups), f"{seconds:.0f}",
            f"{plan.peak_node} in {plan.peak_module_path or '<top level>'}"]


HEADERS = ["model", "frames x size", "video tokens", "batch", "blocks", "eager act. GiB", "fxstream min act. GiB", "min / eager",
           "sliced groups", "plan s", "bounded at"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--layers", type=int, default=None, help="build this many blocks (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dit_plan.md"))
    args = parser.parse_args(argv)
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
