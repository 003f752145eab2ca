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
# (module, attribute); attribute None: the module itself.
_EXPORTS = {
    "capture": ("fxstream.capture", "capture"),
    "compile": ("fxstream.api", "compile"),
    "optimize": ("fxstream.pipelines", "optimize"),
    "estimate": ("fxstream.analysis", "estimate"),
    "measure": ("fxstream.measure", "measure"),
    "Measurement": ("fxstream.measure", "Measurement"),
    "StreamlinedModule": ("fxstream.module", "StreamlinedModule"),
    "calibrate": ("fxstream.calibrate", "calibrate"),
    "Calibration": ("fxstream.calibrate", "Calibration"),
    "RehashConfig": ("fxstream.runtime.rehash", "RehashConfig"),
    "Schedule": ("fxstream.runtime.rehash", "Schedule"),
    "reference": ("fxstream.reference", None),
    "Plan": ("passes.plan", "Plan"),
    "errors": ("fxstream.errors", None),
    "models": ("fxstream.models", None),
}

__all__ = sorted(_EXPORTS)

# Functions that share their module's name are bound eagerly: importing the submodule (which the rest of the
# package does) would otherwise replace the lazily bound function by the module on the package.
from fxstream.capture import capture  # noqa: E402
from fxstream.measure import Measurement, measure  # noqa: E402
from fxstream.calibrate import calibrate  # noqa: E402


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxstream' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from fxstream import errors, models, reference
    from fxstream.calibrate import Calibration, calibrate
    from fxstream.runtime.rehash import RehashConfig, Schedule
    from fxstream.analysis import estimate
    from fxstream.api import compile
    from fxstream.capture import capture
    from fxstream.measure import Measurement, measure
    from fxstream.module import StreamlinedModule
    from passes.plan import Plan
