"""StreamlinedModule: the drop-in replacement ``fxstream.compile`` returns.

It is called exactly like the original module and returns the same types. On the first call with a new input
signature (tensor shapes, dtypes and devices, and the values of non-tensor arguments) it captures the module,
groups its operators, chooses slice counts for the budget and keeps the sliced GraphModule; later calls with
that signature reuse it. Attributes the module does not have (``config``, ``dtype``, ``device``...) are read
from the original, whose parameters it shares.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from fxstream.capture import TIMESTEP_NAMES, capture, normalize_inputs
from fxstream.runtime.rehash import FeatureCache, RehashConfig, RehashController
from passes.memory import MemoryTimeline, format_bytes
from fxstream import plan_cache
from fxstream.errors import PlanMismatchError
from passes.pipeline import PartialGraph, PlanRequest
from passes.pipeline import plan as plan_graph
from passes.pipeline import replay as replay_graph
from passes.plan import Plan


@dataclass
class CompiledEntry:
    """One input signature's compiled graph and what was decided for it."""

    graph_module: torch.fx.GraphModule
    plan: Plan
    baseline: MemoryTimeline
    planned: MemoryTimeline
    compile_seconds: float
    partial: PartialGraph | None = None  # the rehash step's graph, when Step Rehash is on


def signature_of(args: tuple) -> tuple:
    """A hashable key of the normalised call: tensors by shape, dtype and device; other values by repr."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append(("T", tuple(a.shape), str(a.dtype), str(a.device)))
        else:
            key.append(("V", repr(a)))
    return tuple(key)


def describe_signature(args: tuple) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


def build_plan(
    module: nn.Module,
    args: tuple,
    *,
    budget_bytes: int | None,
    chunks: int | None = None,
    target: str | None = None,
    kwargs: dict | None = None,
    rehash: RehashConfig | None = None,
    cache: FeatureCache | None = None,
    replay: Plan | None = None,
) -> CompiledEntry:
    """Capture ``module`` on normalised ``args`` (and keyword-only ``kwargs``) and plan it with the one planner,
    :func:`passes.pipeline.plan`: for the budget (or ``chunks`` everywhere); with ``rehash``, the full graph
    stores the cache point's value in ``cache`` and a partial graph for rehash steps is planned too.

    With ``replay``, the saved plan is rebuilt instead (:func:`passes.pipeline.replay`; PlanMismatchError when
    it does not fit). Otherwise the on-disk plan cache (:mod:`fxstream.plan_cache`) is read first and written
    after planning.
    """
    start = time.perf_counter()
    kwargs = kwargs or {}
    request = request_for(args, budget_bytes=budget_bytes, chunks=chunks, target=target, rehash=rehash)
    cache_key = None
    stored = replay
    if replay is None and plan_cache.enabled():
        cache_key = plan_cache.key(module, args, kwargs, request)
        entry = plan_cache.load(cache_key)
        stored = entry[0] if entry is not None else None
    gm = capture(module, *args, **kwargs)
    planned = None
    if stored is not None:
        try:
            planned = replay_graph(gm, stored, request, cache=cache)
        except PlanMismatchError:
            if replay is not None:
                raise
            # a cached plan for another graph (the module's code changed): plan again
    if planned is None:
        planned = plan_graph(gm, request, cache=cache)
        if cache_key is not None and not planned.plan.notes:
            plan_cache.save(cache_key, planned.plan, planned.baseline, planned.planned)
    return CompiledEntry(planned.graph_module, planned.plan, planned.baseline, planned.planned,
                         time.perf_counter() - start, planned.partial)


def request_for(args: tuple, *, budget_bytes: int | None, chunks: int | None, target: str | None,
                rehash: RehashConfig | None) -> PlanRequest:
    """The planner's request for a call with normalised ``args`` (target: the inputs' device if None)."""
    return PlanRequest(budget_bytes=budget_bytes, chunks=chunks, target=target or target_of(args),
                       signature=describe_signature(args), rehash=rehash)


def request_of(plan: Plan) -> dict:
    """The planning options a saved Plan was made with, as :func:`build_plan` takes them."""
    rehash = plan.rehash.config if plan.rehash is not None else None
    return dict(budget_bytes=plan.budget_bytes, target=plan.target, rehash=rehash)


def _timestep_index(module: nn.Module) -> int | None:
    """Position of the timestep argument in the normalised call (see ``normalize_inputs``)."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    for name in TIMESTEP_NAMES:
        if name in params:
            return params.index(name)
    return None


def target_of(args: tuple) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return "cuda" if a.device.type in ("cuda", "meta") else "cpu"
    return "cpu"


class StreamlinedModule(nn.Module):
    """A module compiled by fxstream: same call, same outputs, less memory. See :func:`fxstream.compile`."""

    def __init__(self, module: nn.Module, *, budget_bytes: int | None, chunks: int | None, target: str | None,
                 rehash: RehashConfig | None = None, replay: Plan | None = None):
        super().__init__()
        self.original = module
        self._fx_replay = replay  # a saved Plan, rebuilt on the first call instead of planning
        self._fx_budget_bytes = budget_bytes
        self._fx_chunks = chunks
        self._fx_target = target
        self._fx_cache: dict[tuple, CompiledEntry] = {}
        self._fx_last: CompiledEntry | None = None
        self._fx_rehash = RehashController(rehash) if rehash is not None else None
        self._fx_timestep_index = _timestep_index(module)

    # -- calling -----------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat, extra = normalize_inputs(self.original, args, kwargs)
        key = signature_of(flat) + signature_of(tuple(extra.items()))
        entry = self._fx_cache.get(key)
        if entry is None:
            # compiling is not part of the call: a dispatch mode watching the call (fxstream.measure) must not
            # see the tracer's tensors
            rehash = self._fx_rehash
            with _disable_current_modes():
                entry = build_plan(
                    self.original, flat, budget_bytes=self._fx_budget_bytes, chunks=self._fx_chunks,
                    target=self._fx_target, kwargs=extra,
                    rehash=rehash.config if rehash is not None else None,
                    cache=rehash.cache if rehash is not None else None, replay=self._fx_replay,
                )
            self._fx_cache[key] = entry
        self._fx_last = entry
        if self._fx_rehash is None or entry.partial is None:
            return entry.graph_module(*flat, **extra)
        timestep = flat[self._fx_timestep_index] if self._fx_timestep_index is not None else None
        full = self._fx_rehash.next_call(timestep, key)
        graph_module = entry.graph_module if full else entry.partial.graph_module
        return graph_module(*flat, **extra)

    # -- Step Rehash -------------------------------------------------------------------------------------------
    @property
    def rehash(self) -> RehashController | None:
        """The Step Rehash controller (None when rehash is off): ``reset()``, ``set_step(i)``, ``history``."""
        return self._fx_rehash

    # -- what was decided --------------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        """The Plan of the most recent call's input signature (None before the first call)."""
        return self._fx_last.plan if self._fx_last else None

    @property
    def compiled(self) -> CompiledEntry | None:
        return self._fx_last

    def report(self) -> str:
        """Baseline (eager) vs planned memory, per block, for the most recent input signature."""
        from fxstream.report import plan_report

        if self._fx_last is None:
            return "not compiled yet: call the module once"
        text = plan_report(self._fx_last)
        print(text)
        return text

    # -- drop-in attributes ------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self._modules.get("original")
            if original is None:
                raise
            return getattr(original, name)

    def extra_repr(self) -> str:
        budget = "minimum" if self._fx_budget_bytes is None else format_bytes(self._fx_budget_bytes)
        text = f"budget={budget}, compiled_signatures={len(self._fx_cache)}"
        if self._fx_replay is not None:
            text += f", replaying a plan for ({self._fx_replay.signature})"
        if self._fx_rehash is not None:
            text += f", rehash={self._fx_rehash.config.cache_point}: {self._fx_rehash.config.schedule.describe()}"
        return text
