"""Predicted memory of full-size video models: eager, eager with diffusers' feed-forward chunking, fxstream.

    python benchmarks/plan_table.py                     # every setup; writes benchmarks/results/plan_table.md
    python benchmarks/plan_table.py --models svd,svd-vae-decoder
    python benchmarks/plan_table.py --quick --out /tmp/plan_table.md   # tiny models (kept alive by a test)

Everything here is a prediction of ``passes/memory.py`` on the real architectures built on the ``meta`` device
(no weights, no memory, no GPU): fp16, classifier-free guidance on (UNet batch 2), target CUDA (flash /
memory-efficient SDPA workspaces). Peaks are weights + activations, in GiB; graph inputs are held by the
caller and not counted. Per model:

- eager: ``analyze_memory(lifetime="eager")`` on the captured graph (values held by Python frames stay alive).
- eager + FF chunking: the model with diffusers' feed-forward chunking (see :func:`enable_ff_chunking`),
  captured again and estimated the same way; ``-`` where the model has no ``enable_forward_chunking``.
- fxstream: what ``fxstream.compile`` plans, at the lowest reachable peak (``budget None``) and at each budget:
  the one planner (``passes.pipeline.plan``) on one capture per model: operator groups, and row streaming of
  the tail (``passes/rows.py``) where groups alone cannot meet the budget or where it lowers the minimum by 5%.

A whole-pipeline table follows: resident fp16 weights of the pipeline's components plus the larger of the UNet
step's and the VAE decode's activation peaks.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gib, write_results  # noqa: E402
from fxstream.capture import capture  # noqa: E402
from fxstream.errors import BudgetError  # noqa: E402
from fxstream.models import build  # noqa: E402
from passes.pipeline import PlanRequest  # noqa: E402
from passes.pipeline import plan as plan_graph  # noqa: E402
from passes.memory import analyze_memory  # noqa: E402

GiB = 2**30


@dataclass(frozen=True)
class Setup:
    key: str  # row label, unique
    name: str  # zoo name
    frames: int | None  # None: the zoo's default for the size
    height: int | None
    width: int | None


# The paper's settings (SVD / SVD-XT at 576x1024, AnimateDiff at 512x512, also at 576x1024), ModelScope at its
# pipeline default (16 frames 256x256), and the VAE decoders the pipelines run after the UNet (all frames at
# once, the pipelines' default decode_chunk_size). sd-vae-decoder at 576x1024 completes the AnimateDiff
# 576x1024 pipeline row.
FULL_SETUPS = [
    Setup("svd", "svd", 14, 576, 1024),
    Setup("svd-xt", "svd-xt", 25, 576, 1024),
    Setup("animatediff", "animatediff", 16, 512, 512),
    Setup("animatediff 576x1024", "animatediff", 16, 576, 1024),
    Setup("modelscope", "modelscope", None, None, None),
    Setup("svd-vae-decoder", "svd-vae-decoder", 14, 576, 1024),
    Setup("svd-vae-decoder 25f", "svd-vae-decoder", 25, 576, 1024),
    Setup("sd-vae-decoder", "sd-vae-decoder", 16, 512, 512),
    Setup("sd-vae-decoder 576x1024", "sd-vae-decoder", 16, 576, 1024),
]
# --quick: tiny zoo models at their tiny default size (4 frames 128x128), enough for an SVD pipeline row.
QUICK_SETUPS = [
    Setup("svd", "svd", None, None, None),
    Setup("svd-vae-decoder", "svd-vae-decoder", None, None, None),
]

# Parameters of the pipeline components that are not in the zoo, counted on the meta device from the released
# pipelines' architectures (fxstream.pipelines.build(name, "full")): the whole VAEs (encoder included; it stays
# resident with the decoder), and the CLIP encoders.
def _params(pipeline: str, component: str) -> int:
    from fxstream import pipelines

    return sum(p.numel() for p in getattr(pipelines.build(pipeline, "full"), component).parameters())


SVD_VAE_PARAMS = _params("svd", "vae")  # AutoencoderKLTemporalDecoder, 97,742,847
SD_VAE_PARAMS = _params("animatediff", "vae")  # AutoencoderKL (SD-1.5's), 83,653,863
CLIP_VISION_H_PARAMS = _params("svd", "image_encoder")  # CLIP ViT-H/14 with projection, 632,076,800
CLIP_TEXT_L_PARAMS = _params("animatediff", "text_encoder")  # CLIP ViT-L/14's text encoder, 123,060,480
FP16 = 2

# Pipelines: (label, UNet setup, VAE-decoder setup, [(component, parameters)] resident besides the UNet).
PIPELINES = [
    ("SVD 14f 576x1024", "svd", "svd-vae-decoder",
     [("VAE", SVD_VAE_PARAMS), ("CLIP image encoder", CLIP_VISION_H_PARAMS)]),
    ("SVD-XT 25f 576x1024", "svd-xt", "svd-vae-decoder 25f",
     [("VAE", SVD_VAE_PARAMS), ("CLIP image encoder", CLIP_VISION_H_PARAMS)]),
    ("AnimateDiff 16f 512x512", "animatediff", "sd-vae-decoder",
     [("VAE", SD_VAE_PARAMS), ("CLIP text encoder", CLIP_TEXT_L_PARAMS)]),
    ("AnimateDiff 16f 576x1024", "animatediff 576x1024", "sd-vae-decoder 576x1024",
     [("VAE", SD_VAE_PARAMS), ("CLIP text encoder", CLIP_TEXT_L_PARAMS)]),
]
QUICK_PIPELINES = [("SVD (tiny models, full-size encoder weights)", "svd", "svd-vae-decoder",
                    [("VAE", SVD_VAE_PARAMS), ("CLIP image encoder", CLIP_VISION_H_PARAMS)])]

# Blocks whose feed-forward input is (batch x pixels, frames, channels): chunked along dim 1 (per frame).
_TEMPORAL_PARTS = ("motion_modules", "temp_attentions", "transformer_in")


def enable_ff_chunking(module: torch.nn.Module) -> str | None:
    """Turn on diffusers' feed-forward chunking, one frame per chunk; return how, or None if not offered.

    SVD (UNetSpatioTemporalConditionModel): ``enable_forward_chunking()``, i.e. chunk_size 1, dim 0: spatial
    blocks (batch x frames, pixels, channels) run per frame, and the temporal blocks hard-code dim 1
    (batch x pixels, frames, channels), per frame too.

    UNetMotionModel (AnimateDiff) and UNet3DConditionModel (ModelScope) offer ``enable_forward_chunking(
    chunk_size, dim)`` too, but with one dim for every block: with chunk_size 1 either the spatial blocks are
    chunked per token (dim 1) or the temporal ones per pixel column (dim 0), 8192 chunks of one row per block
    at 512x512 (AnimateDiff at chunk_size 1 runs 414k (dim 1) / 611k (dim 0) ATen ops instead of 5.4k;
    ModelScope 110k / 181k instead of ~5k): neither captures in reasonable time, nor would anyone run it.
    So each transformer block gets diffusers' own ``set_chunk_feed_forward(1, dim)`` with the per-frame dim,
    as SVD's method does: dim 0 for spatial blocks, dim 1 for temporal ones (motion modules,
    ``temp_attentions``, ``transformer_in``).
    """
    if not hasattr(module, "enable_forward_chunking"):
        return None
    if type(module).__name__ == "UNetSpatioTemporalConditionModel":
        module.enable_forward_chunking()
        return "enable_forward_chunking()"
    for path, sub in module.named_modules():
        if hasattr(sub, "set_chunk_feed_forward"):
            temporal = any(part in path.split(".") for part in _TEMPORAL_PARTS)
            sub.set_chunk_feed_forward(chunk_size=1, dim=1 if temporal else 0)
    return "set_chunk_feed_forward(1, per-frame dim) per block"


def disable_ff_chunking(module: torch.nn.Module) -> None:
    for sub in module.modules():
        if hasattr(sub, "set_chunk_feed_forward"):
            sub.set_chunk_feed_forward(chunk_size=None, dim=0)


@dataclass
class PlanCell:
    budget_gb: float | None
    peak_bytes: int | None = None  # weights + activations
    activation_bytes: int | None = None
    sliced: int = 0
    status: str = "planned"  # planned | unsliced | infeasible | error
    floor_bytes: int | None = None
    message: str = ""
    rows: int = 0  # row-streamed segments (passes/rows.py)

    def text(self) -> str:
        if self.status == "infeasible":
            return f"infeasible (floor {gib(self.floor_bytes)})"
        if self.status == "error":
            return f"error: {self.message}"
        if self.status == "unsliced":
            return f"fits unsliced ({gib(self.peak_bytes)})"
        rows = f" + {self.rows} row-streamed" if self.rows else ""
        return f"{gib(self.peak_bytes)} ({self.sliced} groups{rows})"


@dataclass
class ModelResult:
    setup: Setup
    description: str
    weight_bytes: int
    nodes: int
    eager_activation: int
    chunked_activation: int | None = None
    chunking: str | None = None
    chunked_nodes: int | None = None
    groups: int = 0
    plans: list[PlanCell] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def eager_peak(self) -> int:
        return self.weight_bytes + self.eager_activation

    @property
    def chunked_peak(self) -> int | None:
        return None if self.chunked_activation is None else self.weight_bytes + self.chunked_activation

    def min_plan(self) -> PlanCell | None:
        return next((p for p in self.plans if p.budget_gb is None and p.peak_bytes is not None), None)


def _log(msg: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)


def run_setup(setup: Setup, *, size: str, budgets: list[float | None], chunking: bool,
              started: float) -> ModelResult:
    t0 = time.perf_counter()
    built = build(setup.name, size, frames=setup.frames, height=setup.height, width=setup.width,
                  dtype=torch.float16, cfg=True)
    module = built.module
    desc = f"{built.frames}f {built.height}x{built.width}"
    _log(f"{setup.key}: {desc}, capturing", started)
    gm = capture(module, *built.args, **built.kwargs)
    t_capture = time.perf_counter() - t0
    eager = analyze_memory(gm, lifetime="eager", target="cuda")
    result = ModelResult(setup, desc, eager.weight_bytes, len(gm.graph.nodes), eager.activation_peak_bytes)
    result.seconds["capture"] = t_capture

    t0 = time.perf_counter()
    for budget in budgets:
        cell = PlanCell(budget)
        budget_bytes = None if budget is None else int(budget * GiB)
        try:
            # what fxstream.compile decides: the one planner, on this capture
            planned = plan_graph(gm, PlanRequest(budget_bytes=budget_bytes, target="cuda"))
        except BudgetError as e:
            cell.status, cell.floor_bytes = "infeasible", e.min_peak_bytes
        except Exception as e:  # one failed plan must not cost the other cells
            traceback.print_exc()
            cell.status, cell.message = "error", f"{type(e).__name__}: {str(e)[:80]}"
        else:
            decided = planned.plan
            result.groups = decided.candidate_groups
            cell.peak_bytes = decided.predicted_peak_bytes
            cell.activation_bytes = decided.predicted_activation_peak_bytes
            cell.rows = sum(1 for g in decided.groups if g.kind == "rows")
            cell.sliced = len(decided.sliced_groups) - cell.rows
            if cell.sliced == 0 and not cell.rows:
                cell.status = "unsliced"
            del planned
        _log(f"{setup.key}: budget {'min' if budget is None else budget}: {cell.text()}", started)
        result.plans.append(cell)
    result.seconds["plan"] = time.perf_counter() - t0
    del gm
    gc.collect()

    if chunking:
        t0 = time.perf_counter()
        how = enable_ff_chunking(module)
        if how is not None:
            _log(f"{setup.key}: capturing with FF chunking ({how})", started)
            try:
                gm = capture(module, *built.args, **built.kwargs)
                chunked = analyze_memory(gm, lifetime="eager", target="cuda")
                result.chunked_activation, result.chunking = chunked.activation_peak_bytes, how
                result.chunked_nodes = len(gm.graph.nodes)
                del gm
            finally:
                disable_ff_chunking(module)
            result.seconds["chunked"] = time.perf_counter() - t0
    del module, built
    gc.collect()
    _log(f"{setup.key}: done in {sum(result.seconds.values()):.0f} s", started)
    return result


def model_table(results: list[ModelResult], budgets: list[float | None]) -> str:
    headers = ["model", "setup", "nodes", "weights", "eager", "eager + FF chunking"]
    headers += ["fxstream min" if b is None else f"fxstream {b:g} GiB" for b in budgets]
    headers += ["min vs eager", "seconds (capture / plan all / chunked)"]
    rows = []
    for r in results:
        mp = r.min_plan()
        ratio = f"{mp.peak_bytes / r.eager_peak:.2f}x" if mp else "-"
        secs = " / ".join(f"{r.seconds[k]:.0f}" if k in r.seconds else "-"
                          for k in ("capture", "plan", "chunked"))
        rows.append([r.setup.key, r.description, r.nodes, gib(r.weight_bytes), gib(r.eager_peak),
                     gib(r.chunked_peak), *(p.text() for p in r.plans), ratio, secs])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def pipeline_table(results: list[ModelResult], pipelines) -> tuple[str, list[str]]:
    by_key = {r.setup.key: r for r in results}
    headers = ["pipeline", "resident weights", "UNet step act. (eager / FF chunk / fxstream min)",
               "VAE decode act. (eager / fxstream min)", "eager", "eager + FF chunking", "fxstream min",
               "fxstream vs eager"]
    rows, notes = [], []
    for label, unet_key, vae_key, others in pipelines:
        unet, vae = by_key.get(unet_key), by_key.get(vae_key)
        if unet is None or vae is None:
            notes.append(f"- {label}: skipped ({unet_key} and {vae_key} are both needed)")
            continue
        # The decoder's weights are part of the whole VAE counted in ``others``.
        resident = unet.weight_bytes + sum(n * FP16 for _, n in others)
        parts = [f"UNet {gib(unet.weight_bytes)}"] + [f"{c} {gib(n * FP16)}" for c, n in others]
        u_min, v_min = unet.min_plan(), vae.min_plan()
        eager = resident + max(unet.eager_activation, vae.eager_activation)
        chunked = (None if unet.chunked_activation is None
                   else resident + max(unet.chunked_activation, vae.eager_activation))
        fx = (None if u_min is None or v_min is None
              else resident + max(u_min.activation_bytes, v_min.activation_bytes))
        rows.append([
            label, f"{gib(resident)} ({' + '.join(parts)})",
            f"{gib(unet.eager_activation)} / {gib(unet.chunked_activation)} / "
            f"{gib(u_min.activation_bytes if u_min else None)}",
            f"{gib(vae.eager_activation)} / {gib(v_min.activation_bytes if v_min else None)}",
            gib(eager), gib(chunked), gib(fx), "-" if fx is None else f"{fx / eager:.2f}x",
        ])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help="comma-separated zoo names (every setup of each) or row labels; default all")
    parser.add_argument("--budgets", default="min,16,11,8",
                        help="comma-separated GiB; 'min' = lowest reachable")
    parser.add_argument("--quick", action="store_true",
                        help="tiny svd + svd-vae-decoder at 4 frames 128x128 (a smoke run of the same path)")
    parser.add_argument("--no-chunking", action="store_true", help="skip the FF-chunking captures")
    parser.add_argument("--out", default=None,
                        help="markdown file (default benchmarks/results/plan_table.md; with --quick nothing "
                             "is written unless given)")
    args = parser.parse_args(argv)

    budgets = [None if b.strip() == "min" else float(b) for b in args.budgets.split(",") if b.strip()]
    setups, pipelines = (QUICK_SETUPS, QUICK_PIPELINES) if args.quick else (FULL_SETUPS, PIPELINES)
    if args.models:
        wanted = {m.strip() for m in args.models.split(",") if m.strip()}
        unknown = wanted - {s.name for s in setups} - {s.key for s in setups}
        if unknown:
            parser.error(f"--models: unknown {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(dict.fromkeys(s.name for s in setups))}")
        setups = [s for s in setups if s.name in wanted or s.key in wanted]
    size = "tiny" if args.quick else "full"
    out = args.out or (None if args.quick else "benchmarks/results/plan_table.md")

    started = time.perf_counter()
    results: list[ModelResult] = []
    failures: list[str] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
        for setup in setups:
            try:
                results.append(run_setup(setup, size=size, budgets=budgets, chunking=not args.no_chunking,
                                         started=started))
            except Exception as e:  # one model failing must not cost the others' rows
                traceback.print_exc()
                failures.append(f"- {setup.key}: {type(e).__name__}: {str(e)[:200]}")
                gc.collect()
    total = time.perf_counter() - started

    table = model_table(results, budgets)
    ptable, pnotes = pipeline_table(results, pipelines)
    chunk_ways = list(dict.fromkeys(f"{r.setup.name}: `{r.chunking}`" for r in results if r.chunking))
    sections = [
        "Predictions of `passes/memory.py` "
        f"({'tiny zoo models' if args.quick else 'full-size architectures'} "
        "on the meta device: no weights, no GPU), fp16, classifier-free guidance on (UNet batch 2), target "
        "CUDA (flash / memory-efficient SDPA workspaces). GiB, weights + activations; graph inputs are held "
        "by the caller and not counted. Total run time "
        f"{total:.0f} s.",
        "",
        "## Per model",
        "",
        "- eager: `analyze_memory(lifetime=\"eager\")` of the captured graph (Python frames hold values as "
        "eager PyTorch does).",
        "- eager + FF chunking: diffusers' feed-forward chunking, one frame per chunk, captured again and "
        "estimated the same way (" + "; ".join(chunk_ways) + "). UNetMotionModel and UNet3DConditionModel "
        "have `enable_forward_chunking(chunk_size, dim)` but apply one dim to every block: at chunk_size 1 "
        "either the spatial blocks are chunked per token (dim 1) or the temporal ones per pixel column "
        "(dim 0), 414k-611k ATen ops for AnimateDiff (110k-181k for ModelScope) instead of ~5k, which "
        "neither "
        "captures in reasonable time nor would be run; so each block gets diffusers' own "
        "`set_chunk_feed_forward(1, dim)` with the per-frame dim (0 spatial, 1 temporal), which is what "
        "SVD's "
        "`enable_forward_chunking()` does. A one-off check on the tiny AnimateDiff (8 frames 128x128, not "
        "part "
        "of this script) gave the same eager peak for `enable_forward_chunking(1, dim=0)`, `(1, dim=1)` and "
        "the per-frame setting (3.75 MiB, 6.25 MiB unchunked): once the feed-forward is chunked, the peak "
        "moves elsewhere. `-`: the model has no forward chunking (VAE decoders).",
        "- fxstream: what `fxstream.compile` plans (`passes.pipeline.plan`; graph lifetimes: each value freed after its last use), with the decoder's tail row-streamed (`passes/rows.py`) where groups alone cannot meet the budget or where that lowers the minimum, at the lowest "
        "reachable peak (min) and at each budget, on one capture per model (`passes.pipeline.plan`); `(N groups)` is how "
        "many operator groups are sliced; `fits unsliced (X)`: the unsliced graph already fits, at X; "
        "`infeasible (floor X)`: BudgetError, X is the lowest reachable peak.",
        "",
        table,
        "",
        "## Whole pipeline",
        "",
        "Resident fp16 weights of every component + the larger of the UNet step's and the VAE decode's "
        "activation peaks (the phases run one after the other; the encoders' own activations are far "
        "smaller and not counted). Activations (act.) in GiB. Weights: UNet from the captured graph; whole "
        f"VAE (encoder kept resident): SVD {SVD_VAE_PARAMS:,} and SD-1.5 {SD_VAE_PARAMS:,} parameters, "
        "counted "
        "on the meta device from the model cards' configs; CLIP text encoder ViT-L/14 "
        f"{CLIP_TEXT_L_PARAMS:,}. Assumption: SVD's CLIP image encoder is ViT-H/14 with projection, "
        f"{CLIP_VISION_H_PARAMS:,} parameters ({CLIP_VISION_H_PARAMS * FP16 / GiB:.2f} GiB in fp16). The "
        "eager + FF chunking column chunks the UNet only (the VAE decoders have no such option).",
        "",
        ptable,
        "",
        *pnotes,
        *(["## Failures", "", *failures, ""] if failures else []),
        "Step Rehash FLOPs at full size: `fxstream plan --model svd-xt --rehash` (see docs/results.md).",
    ]
    print(table)
    print()
    print(ptable)
    for line in pnotes + failures:
        print(line)
    print(f"total {total:.0f} s", file=sys.stderr)
    if out:
        write_results(out, "fxstream predicted memory: eager vs FF chunking vs fxstream"
                      + (" (quick smoke run, tiny models)" if args.quick else ""), sections)
        print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
