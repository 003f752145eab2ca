"""GPU benchmark: eager vs fxstream on full-size video models with random fp16 weights (no download).

    python benchmarks/gpu.py                      # CUDA, full size; writes benchmarks/results/gpu.md
    python benchmarks/gpu.py --tiny --device cpu  # the same path on tiny models (kept alive by a test)

For each model: eager, then fxstream at the lowest budget and at the given budgets (GiB, weights included).
Measured: activation peak (``torch.cuda.max_memory_allocated`` above what was allocated before the call; on CPU
the live-storage count of ``fxstream.measure``), device memory in use from NVML after the call (CUDA context and
allocator cache included, as the paper reports), median latency, compile time (capture + plan), and the
compiled-vs-eager max error relative to max|eager|. Then a whole pipeline (``--pipeline svd``, random weights
built on the device by ``fxstream.pipelines.build(name, "full", device=...)``) eager and under
``fxstream.optimize`` (``--pipeline-budget``, 8 GiB), and the CUDA context and the allocator's reserve above the
live tensors, the two figures ``fxstream.pipeline_plan`` assumes. Results are written after every model, so a run
cut short still leaves a table. Step Rehash is measured on CPU by `benchmarks/rehash_cpu.py`, not here.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxstream  # noqa: E402
from common import gib, median_seconds, write_results  # noqa: E402
from fxstream.models import build  # noqa: E402

# (zoo name, frames, height, width): the paper's settings (SVD/SVD-XT at 576x1024, AnimateDiff at 512x512)
FULL_SETUPS = [
    ("svd", 14, 576, 1024),
    ("svd-xt", 25, 576, 1024),
    ("animatediff", 16, 512, 512),
    ("svd-vae-decoder", 14, 576, 1024),
    ("sd-vae-decoder", 16, 512, 512),
]


def _sample(out):
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


class Meter:
    """Peak activation bytes of one call, and device memory in use after it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.slack: list[float] = []
        self.nvml = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                self._pynvml = pynvml
            except Exception:  # NVML is optional: no row is lost without it
                self.nvml = None

    def __call__(self, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            # the caching allocator's reserve above the live tensors at the peak (pipeline_plan.ALLOCATOR_SLACK)
            self.slack.append(torch.cuda.max_memory_reserved() / max(1, torch.cuda.max_memory_allocated()) - 1)
            used = self._pynvml.nvmlDeviceGetMemoryInfo(self.nvml).used if self.nvml else None
            return out, peak, used
        m = fxstream.measure(fn)
        return m.output, m.activation_peak_bytes, None


def cuda_context_bytes(device: torch.device) -> int:
    """Device memory the process holds outside PyTorch's allocator after CUDA starts (the context, the kernels
    loaded, cuDNN and cuBLAS handles after one convolution and one matmul): what
    ``fxstream.pipeline_plan.CUDA_CONTEXT_BYTES`` assumes."""
    x = torch.randn(1, 8, 16, 16, device=device, dtype=torch.float16)
    torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3, device=device, dtype=torch.float16))
    x.flatten(1) @ torch.randn(8 * 16 * 16, 8, device=device, dtype=torch.float16)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def run_model(name, frames, height, width, *, size, device, dtype, budgets, repeats, meter):
    rows = []
    built = build(name, size, frames=frames, height=height, width=width, dtype=dtype, device=device)
    module, args, kwargs = built.module, built.args, built.kwargs
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.no_grad():
        ref, peak, used = meter(lambda: _sample(module(*args, **kwargs)))
        latency = median_seconds(lambda: module(*args, **kwargs), repeats, device)
        rows.append([name, "eager", gib(weights), gib(peak), gib(used), f"{latency:.3f}", "-", "-", "-", "-"])
        ref = ref.float()
        for budget in budgets:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            compiled = fxstream.compile(module, budget_gb=budget, target=device.type)
            start = time.perf_counter()
            try:
                compiled(*args, **kwargs)
            except fxstream.errors.BudgetError as e:
                rows.append([name, f"fxstream {budget} GiB", gib(weights), "-", "-", "-", "-", "-", "-",
                             f"infeasible: floor {gib(e.min_peak_bytes)} GiB"])
                continue
            first = time.perf_counter() - start
            entry = compiled.compiled
            out, peak_c, used_c = meter(lambda: _sample(compiled(*args, **kwargs)))
            latency_c = median_seconds(lambda: compiled(*args, **kwargs), repeats, device)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            label = "fxstream min" if budget is None else f"fxstream {budget:g} GiB"
            rows.append([
                name, label, gib(weights), gib(peak_c), gib(used_c), f"{latency_c:.3f}",
                f"{latency_c / latency:.2f}", f"{entry.compile_seconds:.1f} (first call {first:.1f})",
                f"{err:.1e}", f"predicted {gib(entry.plan.predicted_activation_peak_bytes)} GiB; "
                f"{len(entry.plan.sliced_groups)} groups sliced",
            ])
            del compiled, entry, out
    del module, args, kwargs, built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_pipeline(name, *, tiny, device, dtype, budget, meter):
    """A whole pipeline (random weights) eager, then under ``fxstream.optimize`` for ``budget`` GiB: the activation
    peak of one call (2 steps, all frames decoded at once), the time, and the frames' max abs difference."""
    import numpy as np
    import PIL.Image

    from fxstream import pipelines

    pipe = pipelines.build(name, "tiny" if tiny else "full", dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    frames, height, width = (4, 64, 64) if tiny else (pipe.unet.config.num_frames, 576, 1024)
    image = PIL.Image.fromarray((np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8))
    call = dict(num_frames=frames, height=height, width=width, num_inference_steps=2, decode_chunk_size=frames,
                output_type="np")
    weights = sum(p.numel() * p.element_size() for m in pipelines._pipeline_modules(pipe) for p in m.parameters())
    label = f"pipeline {name} {frames}f {height}x{width}"

    def generate():
        with torch.no_grad():
            return np.asarray(pipe(image, generator=torch.Generator().manual_seed(0), **call).frames)

    rows = []
    start = time.perf_counter()
    ref, peak, used = meter(generate)
    eager_s = time.perf_counter() - start
    rows.append([label, "eager", gib(weights), gib(peak), gib(used), f"{eager_s:.3f}", "-", "-", "-", "-"])
    result = fxstream.optimize(pipe, budget_gb=budget, target=device.type)
    start = time.perf_counter()
    generate()  # compiles each component on its first call
    first = time.perf_counter() - start
    start = time.perf_counter()
    out, peak_c, used_c = meter(generate)
    seconds = time.perf_counter() - start
    err = float(np.abs(out - ref).max())
    budget_text = "min" if budget is None else f"{budget:g} GiB"
    rows.append([label, f"fxstream.optimize {budget_text}", gib(weights), gib(peak_c), gib(used_c), f"{seconds:.3f}",
                 f"{seconds / eager_s:.2f}", f"{result.compile_seconds:.1f} (first call {first:.1f})",
                 f"{err:.1e} abs", "frames in [0, 1]"])
    del pipe, result
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


HEADERS = ["model", "variant", "weights GiB", "activation peak GiB", "NVML used GiB", "latency s",
           "vs eager", "compile s", "max rel err", "notes"]


def key_chunk_check(device: torch.device) -> str:
    """The device's attention-with-log-sum-exp kernels as key-chunked attention calls them (fxstream/runtime/keys.py):
    16 key chunks of a 4096-token self-attention against one SDPA call, per dtype the device runs."""
    from fxstream.runtime.keys import KeyChunkedAttention
    from fxstream.runtime.sliced import SlicedInput, slice_bounds

    class Same(torch.nn.Module):
        def forward(self, k, v):
            return k, v

    parts = []
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, 8, 4096, 64, generator=g).to(device, dtype) for _ in range(3))
        lengths = {b - a for a, b in slice_bounds(4096, 16)}
        op = KeyChunkedAttention("check", {n: Same() for n in lengths}, 16, 4096, [SlicedInput(2), SlicedInput(2)],
                                 None, 64, 0)
        with torch.no_grad():
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
            err = float((op(q, k, v).float() - ref).abs().max() / ref.abs().max())
        parts.append(f"{str(dtype).replace('torch.', '')} {err:.1e}")
    return "- key-chunked attention (16 chunks of 4096 keys) vs one SDPA call, max error / max|SDPA|: " + ", ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models (a smoke run of the same code path)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default=",".join(s[0] for s in FULL_SETUPS))
    parser.add_argument("--budgets", default="min,8", help="comma-separated GiB; 'min' = lowest reachable")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline", default="svd", help="a whole pipeline under fxstream.optimize after the "
                        "models ('none' to skip): svd (14 frames 576x1024) or svd-xt (25)")
    parser.add_argument("--pipeline-budget", default="8", help="its budget in GiB, or 'min'")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="start no new model after this many seconds (the table keeps what finished)")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/gpu.md, "
                        "or gpu-tiny-<device>.md with --tiny)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available (use --tiny --device cpu for a smoke run)")
    size = "tiny" if args.tiny else "full"
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    budgets = [None if b.strip() == "min" else float(b) for b in args.budgets.split(",") if b.strip()]
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    setups = [s for s in FULL_SETUPS if s[0] in wanted]
    out = args.out or f"benchmarks/results/{'gpu-tiny-' + device.type if args.tiny else 'gpu'}.md"
    meter = Meter(device)
    rows: list[list] = []
    started = time.perf_counter()
    notes = []
    if device.type == "cuda":
        from fxstream.pipeline_plan import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES

        context = cuda_context_bytes(device)
        notes.append(f"- CUDA context and libraries outside the allocator: {context / 2**20:.0f} MiB "
                     f"(fxstream.pipeline_plan assumes {CUDA_CONTEXT_BYTES / 2**20:.0f} MiB)")
    notes.append(key_chunk_check(device))
    slack_note = len(notes)
    for name, frames, height, width in setups:
        if time.perf_counter() - started > args.time_limit:
            notes.append(f"- skipped {name}: time limit {args.time_limit:.0f} s reached")
            continue
        if args.tiny:
            frames, height, width = 4, 128, 128
        print(f"[{time.perf_counter() - started:6.1f}s] {name} {frames}f {height}x{width} {size}", flush=True)
        try:
            rows += run_model(name, frames, height, width, size=size, device=device, dtype=dtype,
                              budgets=budgets, repeats=args.repeats, meter=meter)
        except Exception as e:  # one model failing must not cost the others' rows
            traceback.print_exc()
            rows.append([name, "error", "-", "-", "-", "-", "-", "-", "-", f"{type(e).__name__}: {str(e)[:120]}"])
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if meter.slack:
            note = (f"- allocator reserve above the live tensors at each measured peak: up to {max(meter.slack):.1%}"
                    f" (fxstream.pipeline_plan assumes {ALLOCATOR_SLACK:.0%})")
            notes[slack_note:slack_note + 1] = [note]
        table = tabulate(rows, headers=HEADERS, tablefmt="github")
        write_results(out, "fxstream GPU benchmark" + (" (tiny smoke run)" if args.tiny else ""),
                      [f"Setups: {', '.join(f'{n} {f}f {h}x{w}' for n, f, h, w in setups)}; "
                       f"{'fp32' if dtype == torch.float32 else 'fp16'}, classifier-free guidance on (UNet batch 2).",
                       "", table, "", *notes])
    if args.pipeline != "none":
        budget = None if args.pipeline_budget == "min" else float(args.pipeline_budget)
        if args.tiny:
            budget = None  # a tiny pipeline fits any real budget unsliced: plan the minimum
        print(f"[{time.perf_counter() - started:6.1f}s] pipeline {args.pipeline}", flush=True)
        try:
            rows += run_pipeline(args.pipeline, tiny=args.tiny, device=device, dtype=dtype, budget=budget,
                                 meter=meter)
        except Exception as e:
            traceback.print_exc()
            rows.append([f"pipeline {args.pipeline}", "error", "-", "-", "-", "-", "-", "-", "-",
                         f"{type(e).__name__}: {str(e)[:120]}"])
        write_results(out, "fxstream GPU benchmark" + (" (tiny smoke run)" if args.tiny else ""),
                      [f"Setups: {', '.join(f'{n} {f}f {h}x{w}' for n, f, h, w in setups)}, and the {args.pipeline} "
                       f"pipeline; {'fp32' if dtype == torch.float32 else 'fp16'}, classifier-free guidance on.",
                       "", tabulate(rows, headers=HEADERS, tablefmt="github"), "", *notes])
    print(tabulate(rows, headers=HEADERS, tablefmt="github"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
