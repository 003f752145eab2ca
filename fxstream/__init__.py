"""fxstream: a training-free torch.fx compiler that runs video-diffusion models in less memory, exactly.

    pipe.unet = fxstream.compile(pipe.unet, budget_gb=8)
    fxstream.optimize(pipe, budget_gb=8)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so `import fxstream` stays fast, and
# diffusers and the graph passes are only loaded by the parts that need them.
# (module, attribute); attribute None: the module itself.
_EXPORTS = {
    "capture": ("fxstream.capture", "capture"),
    "compile": ("fxstream.api", "compile"),
    "plan": ("fxstream.api", "plan"),
    "optimize": ("fxstream.pipelines", "optimize"),
    "plan_pipeline": ("fxstream.pipeline_plan", "plan_pipeline"),
    "PipelinePlan": ("fxstream.pipeline_plan", "PipelinePlan"),
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


class _Package(types.ModuleType):
    """The package object. Importing a submodule binds it on its package, so ``import fxstream.capture`` would
    replace the function ``fxstream.capture`` by its module; a public function keeps its name here, and the
    submodule stays reachable through ``sys.modules`` and ``from fxstream.capture import ...``. Nothing is
    imported eagerly: ``import fxstream.runtime`` (the bottom layer) loads neither passes/ nor the face."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name, (None, None))[1] is not None:
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name not in _EXPORTS:
            raise AttributeError(f"module 'fxstream' has no attribute {name!r}")
        module_name, attribute = _EXPORTS[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        self.__dict__[name] = value
        return value


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # pragma: no cover
    from fxstream import errors, models, reference
    from fxstream.calibrate import Calibration, calibrate
    from fxstream.runtime.rehash import RehashConfig, Schedule
    from fxstream.analysis import estimate
    from fxstream.api import compile, plan
    from fxstream.capture import capture
    from fxstream.measure import Measurement, measure
    from fxstream.module import StreamlinedModule
    from fxstream.pipeline_plan import PipelinePlan, plan_pipeline
    from passes.plan import Plan
