"""The ``fxstream`` command line.

    fxstream plan                                # SVD-XT UNet, 25 frames 576x1024, fp16, CFG: baseline memory
    fxstream plan --model svd-xt --budget-gb 8   # ... and the slicing plan that fits 8 GiB
    fxstream plan --model sd-vae-decoder --frames 16 --height 512 --width 512 --json plan.json
    fxstream generate --model ./svd --image in.png --budget-gb 12 --out out.mp4   # see fxstream/generate.py

``plan`` builds a zoo model (full size on the meta device by default: no weights, no memory), captures one
forward as the pipelines call it, and prints where its memory goes. With ``--budget-gb`` or ``--chunks`` it
also plans the slicing and prints the planned side beside the baseline.

Exit status: 0 on success; 2 for bad arguments (including a budget no plan can meet); 1 for other fxstream
errors (e.g. a model that cannot be captured). Errors are one line on stderr: ``fxstream: error: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from fxstream.models import BuiltModel
    from passes.memory import MemoryTimeline
    from passes.plan import Plan

PROG = "fxstream"
DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}
STORAGE_DTYPES = {"fp8": "float8_e4m3fn", "fp8-e5m2": "float8_e5m2"}
TARGETS = ("cuda", "cpu")
SIZES = ("full", "medium", "tiny")
DEFAULT_MODEL = "svd-xt"
# Whole pipelines ``plan --pipeline`` plans (fxstream.pipeline_plan.PIPELINE_DEFAULTS; tests check they agree).
PIPELINES = ("svd", "svd-xt", "animatediff", "modelscope", "wan2.1-1.3b", "wan2.1-14b", "ltx-video",
             "cogvideox-5b", "mochi")
MIN_BUDGET = "min"  # --budget-gb min: as little memory as slicing reaches
# The zoo's names and pixel factor, repeated here so that --help and argument errors need not import torch
# and diffusers (seconds); tests/test_cli.py checks them against fxstream.models.
MODELS = ("svd", "svd-xt", "animatediff", "modelscope", "wan2.1-1.3b", "wan2.1-14b", "hunyuanvideo", "ltx-video",
          "cogvideox-5b", "mochi", "svd-vae-decoder", "sd-vae-decoder", "wan-vae-decoder", "hunyuanvideo-vae-decoder",
          "ltx-vae-decoder", "cogvideox-vae-decoder", "mochi-vae-decoder")
VAE_SCALE_FACTOR = 8
SPINNER_INTERVAL_S = 0.2
# Formats --plot writes (matplotlib's, by file extension) and the resolution of raster ones.
PLOT_FORMATS = ("png", "svg", "pdf")
PLOT_DPI = 130


class UsageError(Exception):
    """A bad command-line argument: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _budget(text: str, words: tuple[str, ...] = (MIN_BUDGET,)) -> float | str:
    """--budget-gb: a positive number of GiB, or one of ``words``."""
    word = text.strip().lower()
    return word if word in words else _positive_float(text)


def _budget_gb(args: argparse.Namespace) -> float | None:
    """--budget-gb as fxstream's functions take it (None: the minimum)."""
    return None if args.budget_gb in (None, MIN_BUDGET) else args.budget_gb


def _pixels(text: str) -> int:
    value = _positive_int(text)
    if value % VAE_SCALE_FACTOR:
        raise argparse.ArgumentTypeError(
            f"must be divisible by {VAE_SCALE_FACTOR} (the VAE's factor from pixels to latents), got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    from fxstream import __version__

    parser = _Parser(
        prog=PROG,
        description="Training-free torch.fx compiler for video-diffusion inference: exact feature slicing "
        "and operator grouping under a memory budget.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plan = commands.add_parser(
        "plan",
        help="where a model's memory goes, and the slicing plan for a budget",
        description="Capture one forward of a zoo model and print its memory: weights, the activation peak "
        "and where it is, the largest tensors live there, and per-block peaks. With --budget-gb or --chunks, "
        "also plan the slicing and print the planned side beside the baseline. With --pipeline, plan a whole "
        "pipeline at full size instead: each phase (encoders, one denoiser step, the VAE decode), eager and "
        "with fxstream, the whole-pipeline peak, and whether it fits in --budget-gb GiB of device memory.",
        epilog="Tables of --model: weights / activation peak / total peak = the module's parameters, the most "
        "bytes of activations live at once, and their sum (what a budget bounds); baseline = eager PyTorch, "
        "planned = fxstream's plan. Largest tensors: what is alive at the peak, the module and op that made "
        "each, its share of the peak. Per block: each top-level block's activation peak. Sliced operator "
        "groups: where a chain of ops runs slice by slice (runs in: its module), what it is sliced along "
        "(frames, pixels, rows, or a tensor dim), slices of the axis length, ops in the chain, and values "
        "computed: the bytes of every value it computes, were they all alive at once (slicing keeps about "
        "1/slices of them live, so it can exceed the peak). Guidance: classifier-free guidance, which doubles "
        "the denoiser's batch. "
        "Columns of --pipeline: weights resident = every component's weights on the device while the "
        "phase runs (with --offload, the running component's only); held = decoded frames of earlier decode "
        "calls; eager activations / eager peak = without fxstream; fxstream share = what the phase's tensors may "
        "use (the budget less the CUDA allowance, the other weights and the held frames); fxstream peak = "
        "weights + planned activations (encoders run eager, as under fxstream.optimize).",
    )
    plan.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL, metavar="NAME",
                      help=f"zoo model: {', '.join(MODELS)} (default: %(default)s)")
    plan.add_argument("--pipeline", choices=PIPELINES, metavar="NAME",
                      help=f"plan a whole pipeline at full size instead of one model: {', '.join(PIPELINES)}")
    plan.add_argument("--decode-chunk-size", type=_positive_int, metavar="N",
                      help="--pipeline: frames per VAE decode call (default: the pipeline's)")
    plan.add_argument("--offload", action="store_true",
                      help="--pipeline: with model CPU offload (fxstream.optimize(pipe, offload=True)): only the "
                      "running component's weights on the device")
    plan.add_argument("--size", choices=SIZES, default="full",
                      help="full: the real architecture on the meta device (no weights, no memory); "
                      "medium / tiny: small random-weight versions on the CPU (default: %(default)s)")
    plan.add_argument("--frames", type=_positive_int, metavar="N", help="video frames (default: model's)")
    plan.add_argument("--height", type=_pixels, metavar="H", help="video height in pixels (default: model's)")
    plan.add_argument("--width", type=_pixels, metavar="W", help="video width in pixels (default: model's)")
    plan.add_argument("--dtype", choices=tuple(DTYPES), default="fp16",
                      help="weights and activations (default: %(default)s)")
    plan.add_argument("--layerwise-casting", choices=tuple(STORAGE_DTYPES), metavar="FP8",
                      help="store the weights in float8 (fp8: e4m3, fp8-e5m2) and cast each layer to --dtype as "
                      "it runs, as diffusers' enable_layerwise_casting does; weights count at their stored size")
    plan.add_argument("--no-cfg", dest="cfg", action="store_false",
                      help="no classifier-free guidance (UNet batch 1 instead of 2)")
    plan.add_argument("--target", choices=TARGETS, default="cuda",
                      help="device whose attention kernels the memory model assumes (default: %(default)s)")
    limit = plan.add_mutually_exclusive_group()
    limit.add_argument("--budget-gb", type=_budget, metavar="GIB",
                       help="plan slicing so that weights + activations fit in GIB GiB ('min': as little "
                       "memory as slicing reaches); with --pipeline, the device's memory (the CUDA context and "
                       "allocator allowance come off it)")
    limit.add_argument("--chunks", type=_positive_int, metavar="K",
                       help="slice every operator group K times, ignoring any budget (experiments)")
    plan.add_argument("--top", type=_positive_int, default=10, metavar="N",
                      help="live tensors to list at each peak (default: %(default)s)")
    plan.add_argument("--verbose", action="store_true",
                      help="name graph nodes (the ATen ops' names) and group kinds and dims, for debugging")
    plan.add_argument("--json", metavar="PATH", help="also write the baseline timeline and the plan as JSON")
    plan.add_argument("--plot", metavar="PATH",
                      help="also draw the memory timeline (baseline vs plan, the budget line, per-block "
                      f"peaks) to PATH ({', '.join(PLOT_FORMATS)}; needs matplotlib)")
    plan.add_argument("--rehash", action="store_true",
                      help="also list the Step Rehash cache points (the decoder's temporal layers): the FLOPs a "
                      "rehash step skips, the UNet FLOPs saved at --full-steps of --steps, the cached bytes")
    plan.add_argument("--steps", type=_positive_int, default=25, metavar="S",
                      help="denoising steps, for --rehash (default: %(default)s)")
    plan.add_argument("--full-steps", type=_positive_int, default=13, metavar="K",
                      help="steps run in full, for --rehash (default: %(default)s)")
    plan.set_defaults(run=_run_plan)

    from fxstream.generate import add_generate_parser

    add_generate_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxstream`` command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        return args.run(args, argv)
    except UsageError as e:
        return _fail(str(e), 2)
    except BrokenPipeError:  # stdout closed early (``fxstream plan | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from fxstream.errors import BudgetError, FxStreamError

        if isinstance(e, (ValueError, BudgetError)):  # bad arguments, caught by the library
            return _fail(str(e), 2)
        if isinstance(e, (FxStreamError, OSError)):
            return _fail(str(e), 1)
        raise  # a bug: keep the traceback


def _fail(message: str, code: int) -> int:
    one_line = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    print(f"{PROG}: error: {one_line}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------------------------------- progress


@contextlib.contextmanager
def progress(label: str, stream: Any = None) -> Iterator[None]:
    """``label ... 12.3 s`` on stderr while the body runs, then ``label ... done in 19.4 s``.

    On a terminal the seconds tick in place; elsewhere (logs, CI, pytest) the label is written when the step
    starts and the outcome appended when it ends, one line per step.
    """
    stream = stream or sys.stderr
    start = time.perf_counter()
    tty = hasattr(stream, "isatty") and stream.isatty()
    stop = threading.Event()
    ticker = None
    if tty:
        def tick() -> None:
            while not stop.wait(SPINNER_INTERVAL_S):
                stream.write(f"\r{label} ... {time.perf_counter() - start:.1f} s")
                stream.flush()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    else:
        stream.write(f"{label} ... ")
        stream.flush()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        elapsed = time.perf_counter() - start
        outcome = f"done in {elapsed:.1f} s" if ok else f"failed after {elapsed:.1f} s"
        stream.write(f"\r{label} ... {outcome}\n" if tty else f"{outcome}\n")
        stream.flush()


# ------------------------------------------------------------------------------------------------------- plan


def _run_plan(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    import fxstream
    from fxstream import models
    from fxstream.analysis import estimate
    from fxstream.capture import normalize_inputs

    if args.json:
        _check_writable(args.json)  # before the work, not after it
    if args.plot:
        _check_plot(args.plot)
    if args.pipeline is not None:
        return _run_plan_pipeline(args, argv)
    for option, given in (("--decode-chunk-size", args.decode_chunk_size), ("--offload", args.offload)):
        if given:
            raise UsageError(f"argument {option}: only with --pipeline")
    if args.rehash and args.full_steps > args.steps:
        raise UsageError(f"argument --full-steps: {args.full_steps} is more than --steps {args.steps}")
    label = f"{args.model} ({args.size}, {'meta' if args.size == 'full' else 'cpu'})"
    with progress(f"building {label}"):
        built = models.build(args.model, args.size, frames=args.frames, height=args.height, width=args.width,
                             cfg=args.cfg, dtype=getattr(torch, DTYPES[args.dtype]))
    if args.layerwise_casting:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(built.module, storage_dtype=getattr(torch, STORAGE_DTYPES[args.layerwise_casting]),
                                compute_dtype=built.dtype)
    flat, keyword_only = normalize_inputs(built.module, built.args, built.kwargs)
    if keyword_only:  # the estimate takes positional arguments only; never silently drop one
        raise ValueError(f"{args.model}: keyword-only arguments {sorted(keyword_only)} cannot be planned")

    if args.budget_gb is not None or args.chunks is not None:
        limit = (f"{args.chunks} chunks" if args.chunks is not None else "the minimum"
                 if args.budget_gb == MIN_BUDGET else f"budget {args.budget_gb:g} GiB")
        with progress(f"capturing and planning {label} for {limit}"), _quiet_torch():
            plan = fxstream.plan(built.module, *flat, budget_gb=_budget_gb(args), chunks=args.chunks,
                                 target=args.target)
        baseline, planned, graph_module = plan.details.baseline, plan.details.planned, plan.details.graph_module
    else:
        with progress(f"capturing {label}"), _quiet_torch():
            # The eager lifetime model, as the planner's baseline: values held by Python frames stay alive.
            baseline = estimate(built.module, *flat, lifetime="eager", target=args.target)
        planned = plan = graph_module = None

    baseline = _concrete_input_bytes(baseline, flat)
    planned = _concrete_input_bytes(planned, flat) if planned is not None else None
    print(_plan_text(args, argv, built, baseline, planned, plan))
    if args.rehash:
        with progress(f"capturing {label} for Step Rehash"), _quiet_torch():
            text = (_rehash_text(built.module, flat, args.steps, args.full_steps) if built.spec.family == "unet"
                    else f"Step Rehash: applies to UNets (one call per denoising step), not to {args.model}")
            print("\n" + text)
    if args.json:
        _write_json(args.json, args, built, baseline, planned, plan)
        print(f"\nwrote {args.json}")
    if args.plot:
        _write_plot(args.plot, args, built, baseline, planned, plan, graph_module)
        print(f"\nwrote {args.plot}")
    return 0


def _run_plan_pipeline(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from fxstream import __version__
    from fxstream.pipeline_plan import plan_pipeline

    if "--model" in argv or any(a.startswith("--model=") for a in argv):
        raise UsageError("argument --pipeline: not allowed with --model (a pipeline plans its own models)")
    for option, given in (("--chunks", args.chunks), ("--rehash", args.rehash),
                          ("--layerwise-casting", args.layerwise_casting), ("--size", args.size != "full")):
        if given:
            raise UsageError(f"argument {option}: not allowed with --pipeline")
    label = f"{args.pipeline} (full, meta)"
    with progress(f"building {label}"):
        from fxstream import pipelines

        pipe = pipelines.build(args.pipeline, "full", dtype=getattr(torch, DTYPES[args.dtype]))
    with contextlib.ExitStack() as phase, _quiet_torch():
        def step(name: str) -> None:  # one progress line per phase: end the last one, start this one
            phase.close()
            phase.enter_context(progress(f"planning {name}"))

        result = plan_pipeline(pipe, _budget_gb(args), frames=args.frames, height=args.height, width=args.width,
                               decode_chunk_size=args.decode_chunk_size, offload=args.offload, cfg=args.cfg,
                               target=args.target, progress=step)
    result.pipeline = args.pipeline
    print(result.text())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fxstream": __version__, "command": shlex.join([PROG, *argv]), **result.to_dict()}, f,
                      indent=1)
            f.write("\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        from fxstream.viz import pipeline_figure

        pipeline_figure(result).savefig(args.plot, dpi=PLOT_DPI)
        print(f"\nwrote {args.plot}")
    return 0


def _rehash_text(module: Any, flat: tuple, steps: int, full_steps: int) -> str:
    """The Step Rehash cache points of a captured model and what caching each saves."""
    from tabulate import tabulate

    from fxstream.capture import capture
    from passes import rehash
    from passes.memory import format_bytes

    gm = capture(module, *flat)
    points = rehash.candidates(gm)
    try:
        points.append(rehash.deepcache_point(gm))
        deep = points[-1].path
    except ValueError:
        deep = None
    if not points:
        return "Step Rehash: no cache point (no temporal layer in an up block of this model)"

    rows = [[p.path + (" (DeepCache-style: input of the last up block)" if p.path == deep else ""),
             p.module_class, f"{p.skipped_fraction:.1%}", f"{p.flops_saved(steps, full_steps):.2f}x",
             format_bytes(p.nbytes)]
            for p in points]
    flops = rehash.graph_flops(gm)
    amount = f"{flops / 1e12:.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.2f} GFLOP"
    head = f"Step Rehash cache points: one UNet call is {amount}; FLOPs saved over {steps} steps with {full_steps} full"
    return head + "\n" + tabulate(rows, headers=["cache point", "module", "FLOPs skipped per rehash step",
                                                 f"FLOPs saved ({full_steps}/{steps} full)", "cached feature"],
                                  tablefmt="github")


def _concrete_input_bytes(timeline: MemoryTimeline, inputs: tuple) -> MemoryTimeline:
    """The timeline with ``input_bytes`` as an int.

    ``analyze_memory`` returns a symbolic ``input_bytes`` when an input is a view (AnimateDiff's prompt
    embeddings come from ``repeat_interleave``): export fakes the view's base with a symbolic storage size.
    The bytes the caller holds are those of the inputs' storages, counted here from the inputs themselves.
    """
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef

    if isinstance(timeline.input_bytes, int):
        return timeline
    storages = {StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes()
                for t in inputs if isinstance(t, torch.Tensor)}
    return dataclasses.replace(timeline, input_bytes=sum(storages.values()))


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Hide a torch-internal deprecation warning that copying captured graphs emits (not for the user)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
        yield


def _check_writable(path: str, option: str = "--json") -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"argument {option}: cannot write {path!r}")


def _check_plot(path: str) -> None:
    _check_writable(path, "--plot")
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in PLOT_FORMATS:
        endings = ", ".join("." + f for f in PLOT_FORMATS)
        raise UsageError(f"argument --plot: {path!r} must end in one of {endings}")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("argument --plot: needs matplotlib (pip install 'fxstream[viz]')")


def _plan_text(args: argparse.Namespace, argv: list[str], built: BuiltModel, baseline: MemoryTimeline,
               planned: MemoryTimeline | None, plan: Plan | None) -> str:
    from fxstream.report import (
        block_table, groups_line, groups_table, live_table, summary_table, time_line, total_bytes, where,
    )
    from passes.memory import format_bytes

    cfg = ("guidance on (batch 2)" if built.cfg else "guidance off" if built.spec.uses_cfg
           else "no guidance (VAE decoder)")
    verbose = getattr(args, "verbose", False)
    dtype = str(built.dtype).removeprefix("torch.")
    out = [
        f"{built.name}: diffusers {built.spec.module_class}, {built.num_parameters:,} parameters, "
        f"size {built.size}",
        f"{built.frames} frames {built.height}x{built.width}, {dtype}, {cfg}, target {args.target}"
        + (f"; weights stored as {STORAGE_DTYPES[args.layerwise_casting]}, each layer cast to {dtype} as it runs "
           "(layerwise casting)" if getattr(args, "layerwise_casting", None) else ""),
        f"captured {len(baseline.nodes)} nodes; graph inputs {format_bytes(baseline.input_bytes)} "
        "(held by the caller, not in the totals)",
        "",
        summary_table(baseline, plan),
        "",
        f"baseline peak {where(baseline, verbose)}",
    ]
    if plan is not None:
        limit = (f"{args.chunks} slices per operator group (forced)" if args.chunks is not None
                 else "no budget: as little memory as slicing reaches" if plan.budget_bytes is None
                 else f"budget {format_bytes(plan.budget_bytes)}")
        out += [f"planned peak {where(planned, verbose)}; {limit}", groups_line(plan)]
        if time_line(plan):
            out.append(time_line(plan))
        if not plan.sliced_groups:
            out.append("no slicing needed: planned differs from baseline only because a compiled graph frees "
                       "each value after its last use")
    at = (lambda t: f" ({t.peak_node})") if verbose else (lambda t: "")
    out += ["", f"largest tensors live at the baseline peak{at(baseline)}",
            live_table(baseline, args.top, verbose)]
    if planned is not None:
        out += ["", f"largest tensors live at the planned peak{at(planned)}",
                live_table(planned, args.top, verbose)]
    out += ["", "activation peak per block", block_table(baseline, planned, verbose)]
    if plan is not None and plan.sliced_groups:
        out += ["", "sliced operator groups (largest first)", groups_table(plan, verbose=verbose)]

    out.append("")
    if plan is None:
        out.append(f"total: {format_bytes(total_bytes(baseline))} (weights + activation peak, eager)")
        suggestion = shlex.join([PROG, *(argv or ["plan"]), "--budget-gb", "GIB"])
        out.append(f"to plan slicing under a memory budget: {suggestion}")
    else:
        ratio = plan.predicted_peak_bytes / plan.baseline_peak_bytes if plan.baseline_peak_bytes else 1.0
        budget = format_bytes(plan.budget_bytes) if plan.budget_bytes else "none"
        out.append(f"total: {format_bytes(plan.baseline_peak_bytes)} baseline -> "
                   f"{format_bytes(plan.predicted_peak_bytes)} planned ({ratio:.2f}x; budget {budget})")
    return "\n".join(out)


def _write_json(path: str, args: argparse.Namespace, built: BuiltModel, baseline: MemoryTimeline,
                planned: MemoryTimeline | None, plan: Plan | None) -> None:
    from fxstream import __version__

    data = {
        "fxstream": __version__,
        "model": {
            "name": built.name,
            "size": built.size,
            "frames": built.frames,
            "height": built.height,
            "width": built.width,
            "dtype": str(built.dtype).removeprefix("torch."),
            "cfg": built.cfg,
            "target": args.target,
            "parameters": built.num_parameters,
            "storage_dtype": STORAGE_DTYPES.get(getattr(args, "layerwise_casting", None) or ""),
        },
        "budget_bytes": None if _budget_gb(args) is None else int(args.budget_gb * 2**30),
        "chunks": args.chunks,
        "baseline": baseline.to_dict(),
        "plan": plan.to_dict() if plan is not None else None,
        "planned": planned.to_dict() if planned is not None else None,
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def _write_plot(path: str, args: argparse.Namespace, built: BuiltModel, baseline: MemoryTimeline,
                planned: MemoryTimeline | None, plan: Plan | None, graph_module: Any) -> None:
    from fxstream.viz import memory_timeline_figure

    cfg = "guidance on" if built.cfg else "guidance off" if built.spec.uses_cfg else "no guidance"
    title = (f"{built.name} ({built.size}): {built.frames} frames {built.height}x{built.width}, "
             f"{str(built.dtype).removeprefix('torch.')}, {cfg}, target {args.target}")
    if args.chunks is not None:
        title += f"; {args.chunks} slices per group (forced)"
    fig = memory_timeline_figure(baseline, planned, budget_bytes=plan.budget_bytes if plan else None,
                                 graph_module=graph_module, title=title)
    fig.savefig(path, dpi=PLOT_DPI)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
