"""The on-disk plan cache: a second process that plans the same model for the same inputs, budget and versions
reads the plan instead of searching again (20-60 s at full size), and so do the ranks of a multi-GPU job.

Where: ``$FXSTREAM_CACHE_DIR``, else ``~/.cache/fxstream/plans``; one JSON file per entry. Off with
``FXSTREAM_PLAN_CACHE=0``. Safe to delete at any time.

The key is what a plan depends on, read without capturing: the module's class, its ``config`` (diffusers
models), the names, shapes and dtypes of its parameters and buffers and the classes of its submodules; the
input signature; the budget (or slice count), the target and the Step Rehash config; the versions of
fxstream (and a digest of its code), torch and diffusers. Weights' values do not enter it. An entry holds the Plan and its baseline and
planned memory timelines. ``fxstream.compile`` replays an entry on the graph it captures, after checking the
plan's fingerprint of that graph (a module whose code changed under the same class and config is planned
again); ``fxstream.plan`` answers from the entry without capturing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from passes.memory import MemoryTimeline
from passes.pipeline import PlanRequest
from passes.plan import Plan

ENV_DIR = "FXSTREAM_CACHE_DIR"
ENV_SWITCH = "FXSTREAM_PLAN_CACHE"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def directory() -> Path:
    root = os.environ.get(ENV_DIR)
    return Path(root) if root else Path.home() / ".cache" / "fxstream" / "plans"


def key(module: nn.Module, args: tuple, kwargs: dict, request: PlanRequest) -> str:
    import fxstream

    h = hashlib.sha256()

    def put(*parts: Any) -> None:
        h.update(("|".join(str(p) for p in parts) + "\n").encode())

    put("fxstream", fxstream.__version__, _source_digest(), "torch", torch.__version__, "diffusers",
        _version("diffusers"))
    put(type(module).__module__, type(module).__qualname__)
    config = getattr(module, "config", None)
    if isinstance(config, dict):
        put(json.dumps(dict(config), sort_keys=True, default=str))
    for name, sub in module.named_modules():
        put("module", name, type(sub).__module__, type(sub).__qualname__)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        put("tensor", name, tuple(t.shape), t.dtype, t.device.type)
    for name, value in [*((str(i), a) for i, a in enumerate(args)), *sorted(kwargs.items())]:
        if isinstance(value, torch.Tensor):
            put("input", name, tuple(value.shape), value.dtype, value.device.type)
        else:
            put("input", name, repr(value))
    from passes.timing import costs_for

    put("costs", costs_for(request.target).to_json())  # the table the plan's times (and choices) came from
    put("request", request.budget_bytes, request.chunks, request.target, request.signature,
        json.dumps(request.rehash.to_dict(), sort_keys=True) if request.rehash is not None else None)
    return h.hexdigest()[:40]


@functools.cache
def _source_digest() -> str:
    """A digest of the planner's own code (fxstream/ and passes/): an entry planned by other code than this one
    (a development checkout between releases, a patched install) is never replayed, even at the same version."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for package in ("fxstream", "passes"):
        for path in sorted((root / package).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def load(cache_key: str) -> tuple[Plan, MemoryTimeline, MemoryTimeline] | None:
    """The entry (plan, baseline, planned), or None: absent, unreadable, or of another plan format."""
    path = directory() / f"{cache_key}.json"
    try:
        data = json.loads(path.read_text())
        return (Plan.from_dict(data["plan"]), MemoryTimeline.from_dict(data["baseline"]),
                MemoryTimeline.from_dict(data["planned"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(cache_key: str, plan: Plan, baseline: MemoryTimeline, planned: MemoryTimeline) -> None:
    """Write an entry atomically; a cache that cannot be written is skipped, never an error."""
    try:
        text = json.dumps({"plan": plan.to_dict(), "baseline": _plain(baseline), "planned": _plain(planned)})
        folder = directory()
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
            f.write(text)
        os.replace(f.name, folder / f"{cache_key}.json")
    except Exception:  # noqa: BLE001 - a cache never fails the call it serves
        pass


def _plain(data: Any) -> Any:
    """JSON values only: a symbolic size (an input that is a view, see the CLI) becomes its hint or None."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return {f.name: _plain(getattr(data, f.name)) for f in dataclasses.fields(data)}
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain(v) for v in data]
    if isinstance(data, (str, int, float, bool)) or data is None:
        return data
    try:
        return int(data)
    except (TypeError, ValueError, RuntimeError):
        return None
