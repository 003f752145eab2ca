"""Memory analysis of a module call without running it: capture, then ``passes.memory.analyze_memory``.

    timeline = fxstream.estimate(unet, sample, t, encoder_hidden_states=emb)   # eager baseline
    print(passes.memory.format_report(timeline))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fxstream.capture import capture
from passes.memory import Lifetime, MemoryTimeline, SdpaBackend, Target, analyze_memory, check_options


def estimate(
    module: nn.Module,
    *args: Any,
    lifetime: Lifetime = "eager",
    target: Target | None = None,
    sdpa_backend: SdpaBackend | None = None,
    **kwargs: Any,
) -> MemoryTimeline:
    """Predict the activation-memory timeline of ``module(*args, **kwargs)``.

    The inputs may be real, meta or fake tensors (full-size models are planned on meta, with no memory).

    Args:
        lifetime: ``"eager"`` (default) predicts running ``module`` itself, whose Python frames hold
            arguments and local variables; ``"graph"`` predicts the captured GraphModule, which frees each
            value at its last use.
        target: ``"cpu"`` or ``"cuda"``: the device whose SDPA kernels to model. None: the inputs' device,
            with meta taken as ``"cuda"``.
        sdpa_backend: force ``"flash"``, ``"efficient"`` or ``"math"`` SDPA workspaces.

    Raises:
        CaptureError: the module could not be captured (the message names the submodule and operation).
        ValueError: a bad ``lifetime``, ``target`` or ``sdpa_backend``.
    """
    check_options(lifetime=lifetime, target=target, sdpa_backend=sdpa_backend)  # before a capture of seconds
    gm = capture(module, *args, **kwargs)
    return analyze_memory(gm, lifetime=lifetime, target=target, sdpa_backend=sdpa_backend)
