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
    text = [f"# {title}", "", f"- command: `{command()}`", f"- machine: {machine()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    path.write_text("\n".join(text + sections) + "\n")
