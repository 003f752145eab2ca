"""Exceptions raised by fxstream. Each message says what failed and what the user can do about it."""

from __future__ import annotations


class FxStreamError(Exception):
    """Base class of every error fxstream raises on purpose."""


class CaptureError(FxStreamError):
    """The module could not be captured into an fx graph.

    ``module_path`` names the submodule that was running and ``operation`` the op or Python construct that
    failed, when they can be recovered from the tracer's error.
    """

    def __init__(self, message: str, *, module_path: str | None = None, operation: str | None = None):
        super().__init__(message)
        self.module_path = module_path
        self.operation = operation


class BudgetError(FxStreamError):
    """No plan meets the memory budget.

    ``min_peak_bytes`` is the smallest predicted peak slicing can reach and ``bounding_node`` the node (and
    module path) whose live tensors set that floor.
    """

    def __init__(self, message: str, *, min_peak_bytes: int, bounding_node: str | None = None):
        super().__init__(message)
        self.min_peak_bytes = min_peak_bytes
        self.bounding_node = bounding_node


class UnsupportedModelError(FxStreamError):
    """The model or pipeline is not one fxstream knows how to handle."""


class PlanningWarning(UserWarning):
    """A planning pass stopped on a pattern it does not know; that graph runs whole (exact, unsliced)."""


class PlanMismatchError(FxStreamError):
    """A saved Plan was replayed on a graph, input signature, target or plan format it was not made for."""


class EagerFallbackWarning(UserWarning):
    """A compiled module runs its original module instead of its graph (exact, but without fxstream's memory
    savings): gradients are required, or the module keeps changing. The message says which."""


class InterleavedGenerationError(FxStreamError):
    """Two generations ran through one compiled module with Step Rehash at once (from two threads): its cached
    feature belongs to one generation. Compile one module per concurrent generation."""
