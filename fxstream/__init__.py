"""fxstream: a training-free torch.fx compiler that runs video-diffusion models in less memory, exactly.

    pipe.unet = fxstream.compile(pipe.unet, budget_gb=8)
    fxstream.optimize(pipe, budget_gb=8)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so `import fxstream` stays fast and
# diffusers is only loaded by the parts that need it.
_EXPORTS = {
    "capture": "fxstream.capture",
    "compile": "fxstream.api",
    "estimate": "fxstream.analysis",
    "measure": "fxstream.measure",
    "Measurement": "fxstream.measure",
    "StreamlinedModule": "fxstream.module",
    "Plan": "passes.plan",
    "errors": "fxstream.errors",
    "models": "fxstream.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxstream' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__ == f"fxstream.{name}" else getattr(module, name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from fxstream import errors, models
    from fxstream.analysis import estimate
    from fxstream.api import compile
    from fxstream.capture import capture
    from fxstream.measure import Measurement, measure
    from fxstream.module import StreamlinedModule
    from passes.plan import Plan
