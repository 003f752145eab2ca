"""GPU benchmark: eager vs fxstream on full-size video models with random fp16 weights (no download).

    python benchmarks/gpu.py                      # CUDA, full size; writes benchmarks/results/gpu.md
    python benchmarks/gpu.py --tiny --device cpu  # the same path on tiny models (kept alive by a test)

For each model: eager, then fxstream at the lowest budget and at the given budgets (GiB, weights included).
Measured: activation peak (``torch.cuda.max_memory_allocated`` above what was allocated before the call; on CPU
the live-storage count of ``fxstream.measure``), device memory in use from NVML after the call (CUDA context and
allocator cache included, as the paper reports), median latency, compile time (capture + plan), and the
compiled-vs-eager max error relative to max|eager|. Results are written after every model, so a run cut short
still leaves a table. Step Rehash is measured on CPU by `benchmarks/rehash_cpu.py`, not here.
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


HEADERS = ["model", "variant", "weights GiB", "activation peak GiB", "NVML used GiB", "latency s",
           "vs eager", "compile s", "max rel err", "notes"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models (a smoke run of the same code path)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default=",".join(s[0] for s in FULL_SETUPS))
    parser.add_argument("--budgets", default="min,8", help="comma-separated GiB; 'min' = lowest reachable")
    parser.add_argument("--repeats", type=int, default=3)
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
    print(tabulate(rows, headers=HEADERS, tablefmt="github"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
