"""``fxstream.compile``: the one-line entry point."""

from __future__ import annotations

import numbers

from typing import Any

from torch import nn

from fxstream.module import StreamlinedModule
from fxstream.runtime.rehash import as_config

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
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    if budget_gb is not None and (
        isinstance(budget_gb, bool) or not isinstance(budget_gb, numbers.Real) or not budget_gb > 0
    ):
        raise ValueError(f"budget_gb must be a positive number of GiB, got {budget_gb!r}")
    if chunks is not None and (not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"chunks must be a positive integer, got {chunks!r}")
    if target is not None and target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    if isinstance(module, StreamlinedModule):
        module = module.original
    config = as_config(rehash)
    budget_bytes = None if budget_gb is None else int(budget_gb * 2**30)
    return StreamlinedModule(module, budget_bytes=budget_bytes, chunks=chunks, target=target, rehash=config)
