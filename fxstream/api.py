"""``fxstream.compile``, the one-line entry point, and ``fxstream.plan``, what it would decide."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fxstream import plan_cache
from fxstream.capture import normalize_inputs
from fxstream.module import StreamlinedModule, build_plan, refuse_torch_compiled, request_for, request_of
from fxstream.runtime.rehash import as_config
from passes.plan import Plan

_TARGETS = ("cpu", "cuda")
_BACKENDS = (None, "inductor")


def compile(  # noqa: A001 - mirrors torch.compile
    module: nn.Module,
    budget_gb: float | None = None,
    *,
    chunks: int | None = None,
    target: str | None = None,
    rehash: Any = None,
    plan: Plan | str | Path | None = None,
    backend: str | None = None,
) -> StreamlinedModule:
    """Compile ``module`` so that it runs within ``budget_gb`` GiB (weights + activations), exactly.

    Args:
        module: any ``nn.Module`` torch.export can capture (diffusers video UNets, VAE decoders...).
        budget_gb: memory budget in GiB for the module's weights and activations. None (also spelled
            ``"min"``): as little memory as slicing can reach. A budget the model already fits in leaves it
            unsliced (fastest).
        chunks: force this many slices in every operator group, ignoring the budget (experiments, tests).
        target: ``"cuda"`` or ``"cpu"``: the device whose attention kernels the memory model assumes.
            None: the device of the inputs.
        rehash: Step Rehash (off by default; it changes outputs on rehash steps, by design). What
            :func:`fxstream.calibrate` returns (or its ``.config``) for a calibrated cut and schedule; ``"auto"``,
            uncalibrated: cache the output of the decoder's temporal layer that skips the most FLOPs (on the
            reference models no better than reusing the previous output) and run every other step in full; a
            :class:`~fxstream.RehashConfig`, a
            :class:`~fxstream.Schedule`, a dict, or the path of a saved RehashConfig / Plan JSON. Full steps are
            exact; ``.rehash`` is the controller (steps are inferred from the timesteps, or set with
            ``.rehash.set_step(i)``).
        plan: a saved :class:`~fxstream.Plan` (or the path of its JSON, from ``plan.to_json(path)``): replayed
            on the first call without planning; its budget, target and Step Rehash config are used. A call
            with other inputs than the plan's raises PlanMismatchError.
        backend: None runs the planned graph as it is (eager ATen ops). ``"inductor"``: each sliced group's
            body is compiled by torch's Inductor once per distinct slice shape, each slice its own call (so the
            plan's memory bound holds); the rest runs eager. Compiling takes a while on the first call.

    Returns:
        A :class:`~fxstream.module.StreamlinedModule`, called exactly like ``module``. It compiles on its first
        call for each input signature; ``.plan`` and ``.report()`` then describe what was decided.

    Raises:
        ValueError: for a non-positive budget or chunk count, or an unknown target.
        fxstream.errors.BudgetError: on the first call, when no plan fits the budget.
        fxstream.errors.CaptureError: on the first call, when the module cannot be captured.
        fxstream.errors.PlanMismatchError: on the first call, when ``plan`` was made for another graph or inputs.
    """
    budget_bytes = _check(module, budget_gb, chunks, target)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if isinstance(module, StreamlinedModule):
        module = module.original
    if plan is None:
        return StreamlinedModule(module, budget_bytes=budget_bytes, chunks=chunks, target=target,
                                 rehash=as_config(rehash), backend=backend)
    if budget_gb is not None or chunks is not None or target is not None:
        raise ValueError("plan: a saved plan brings its own budget, slice counts and target; pass budget_gb, "
                         "chunks and target only without it")
    saved = _load_plan(plan)
    options = request_of(saved)
    config = options["rehash"] if rehash is None else as_config(rehash)
    return StreamlinedModule(module, budget_bytes=options["budget_bytes"], chunks=None, target=options["target"],
                             rehash=config, replay=saved, backend=backend)


def _load_plan(plan: Any) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, Path)):
        try:
            return Plan.from_json(Path(plan))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"plan: cannot read a saved plan from {str(plan)!r}: {e}") from e
    raise ValueError(f"plan must be a Plan or the path of its JSON, got {type(plan).__name__}")


def plan(
    module: nn.Module,
    *args: Any,
    budget_gb: float | None = None,
    chunks: int | None = None,
    target: str | None = None,
    rehash: Any = None,
    **kwargs: Any,
) -> Plan:
    """Plan ``module`` for one call with ``args`` / ``kwargs`` without running it: what :func:`compile` would
    decide on that first call.

    Works on modules and inputs on the ``meta`` device (full-size models, no memory, no weights), where the
    memory model assumes CUDA kernels unless ``target`` says otherwise. The options are :func:`compile`'s.

    Returns:
        The :class:`~fxstream.Plan`. While it is fresh, ``plan.details`` holds what the planner worked with:
        ``graph_module`` (the graph that runs the plan), ``baseline`` and ``planned`` (memory timelines).

    Raises:
        ValueError, fxstream.errors.BudgetError, fxstream.errors.CaptureError: as :func:`compile`.
    """
    budget_bytes = _check(module, budget_gb, chunks, target)
    if isinstance(module, StreamlinedModule):
        module = module.original
    flat, extra = normalize_inputs(module, args, kwargs)
    config = as_config(rehash)
    if plan_cache.enabled():  # the answer an earlier process found, without capturing (see fxstream.plan_cache)
        request = request_for(flat, budget_bytes=budget_bytes, chunks=chunks, target=target, rehash=config)
        stored = plan_cache.load(plan_cache.key(module, flat, extra, request))
        if stored is not None:
            saved, baseline, planned = stored
            saved.details = PlanDetails(saved, None, baseline, planned)
            return saved
    entry = build_plan(module, flat, budget_bytes=budget_bytes, chunks=chunks, target=target, kwargs=extra,
                       rehash=config)
    entry.plan.details = PlanDetails(entry.plan, entry.graph_module, entry.baseline, entry.planned)
    return entry.plan


@dataclass
class PlanDetails:
    """What the planner worked with: the plan, the graph that runs it (None for a plan read from the plan
    cache, which answers without capturing), and the baseline and planned memory timelines."""

    plan: Plan
    graph_module: Any
    baseline: Any
    planned: Any


def _check(module: Any, budget_gb: Any, chunks: Any, target: Any) -> int | None:
    """The budget in bytes, after checking every option; ValueError naming the first bad one."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    refuse_torch_compiled(module, "module")
    budget_bytes = budget_bytes_of(budget_gb)
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"chunks must be a positive integer, got {chunks!r}")
    if target is not None and target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    return budget_bytes


MIN_BUDGET = "min"  # budget_gb="min": as None, as little memory as slicing reaches


def budget_bytes_of(budget_gb: Any) -> int | None:
    """``budget_gb`` in bytes (None and ``"min"``: None); ValueError unless it is a positive, finite number of
    GiB."""
    if isinstance(budget_gb, str) and budget_gb == MIN_BUDGET:
        return None
    if budget_gb is not None and (
        isinstance(budget_gb, bool) or not isinstance(budget_gb, numbers.Real) or not budget_gb > 0
        or not math.isfinite(budget_gb)
    ):
        raise ValueError(f"budget_gb must be a positive, finite number of GiB or 'min', got {budget_gb!r}")
    return None if budget_gb is None else int(budget_gb * 2**30)
