"""Shared pieces of the benchmark scripts: machine description, timing, and markdown results files."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch


def machine() -> str:
    """One line naming the machine, torch and diffusers versions."""
    import diffusers

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    else:
        device = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return (f"{device}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
            f"python {platform.python_version()}; {torch.get_num_threads()} threads")


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def commit() -> str:
    """The checkout's commit (with "+dirty" when the tree has uncommitted changes), or "unknown"."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


PEAK_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_rss_bytes(fn) -> int:
    """Extra resident memory at the peak of ``fn()``, read from the kernel (Linux ``VmHWM``, reset first): an
    independent check of fxstream's dispatch-level count, which cannot see inside compiled kernels. Run with
    ``PEAK_RSS_ENV`` set at process start (large blocks mmapped, so freed memory leaves the resident set)."""
    import re

    def status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def write_results(path: str | Path, title: str, sections: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [f"# {title}", "", f"- command: `{command()}`", f"- commit: {commit()}", f"- machine: {machine()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    path.write_text("\n".join(text + sections) + "\n")
