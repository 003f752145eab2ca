"""``fxstream.compile``, the one-line entry point, and ``fxstream.plan``, what it would decide."""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import nn

from fxstream.capture import normalize_inputs
from fxstream.module import StreamlinedModule, build_plan
from fxstream.runtime.rehash import as_config
from passes.plan import Plan

_TARGETS = ("cpu", "cuda")


def compile(  # noqa: A001 - mirrors torch.compile
    module: nn.Module,
    budget_gb: float | None = None,
    *,
    chunks: int | None = None,
    target: str | None = None,
    rehash: Any = None,
) -> StreamlinedModule:
    """Compile ``module`` so that it runs within ``budget_gb`` GiB (weights + activations), exactly.

    Args:
        module: any ``nn.Module`` torch.export can capture (diffusers video UNets, VAE decoders...).
        budget_gb: memory budget in GiB for the module's weights and activations. None: as little memory as
            slicing can reach. A budget the model already fits in leaves it unsliced (fastest).
        chunks: force this many slices in every operator group, ignoring the budget (experiments, tests).
        target: ``"cuda"`` or ``"cpu"``: the device whose attention kernels the memory model assumes.
            None: the device of the inputs.
        rehash: Step Rehash (off by default; it changes outputs on rehash steps, by design). ``"auto"``: cache
            the output of the decoder's temporal layer that skips the most FLOPs and run every other step in
            full; a :class:`~fxstream.RehashConfig` (e.g. from :func:`fxstream.calibrate`), a
            :class:`~fxstream.Schedule`, a dict, or the path of a saved RehashConfig / Plan JSON. Full steps are
            exact; ``.rehash`` is the controller (steps are inferred from the timesteps, or set with
            ``.rehash.set_step(i)``).

    Returns:
        A :class:`~fxstream.module.StreamlinedModule`, called exactly like ``module``. It compiles on its first
        call for each input signature; ``.plan`` and ``.report()`` then describe what was decided.

    Raises:
        ValueError: for a non-positive budget or chunk count, or an unknown target.
        fxstream.errors.BudgetError: on the first call, when no plan fits the budget.
        fxstream.errors.CaptureError: on the first call, when the module cannot be captured.
    """
    budget_bytes = _check(module, budget_gb, chunks, target)
    if isinstance(module, StreamlinedModule):
        module = module.original
    config = as_config(rehash)
    return StreamlinedModule(module, budget_bytes=budget_bytes, chunks=chunks, target=target, rehash=config)


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
    entry = build_plan(module, flat, budget_bytes=budget_bytes, chunks=chunks, target=target, kwargs=extra,
                       rehash=as_config(rehash))
    entry.plan.details = entry
    return entry.plan


def _check(module: Any, budget_gb: Any, chunks: Any, target: Any) -> int | None:
    """The budget in bytes, after checking every option; ValueError naming the first bad one."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    if budget_gb is not None and (
        isinstance(budget_gb, bool) or not isinstance(budget_gb, numbers.Real) or not budget_gb > 0
        or not math.isfinite(budget_gb)
    ):
        raise ValueError(f"budget_gb must be a positive, finite number of GiB, got {budget_gb!r}")
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"chunks must be a positive integer, got {chunks!r}")
    if target is not None and target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    return None if budget_gb is None else int(budget_gb * 2**30)
