"""Never a crash: the video models people run today, as a new user points fxstream at them.

Tiny random-weight configs of diffusers' video transformers (Wan, LTX-Video, CogVideoX, HunyuanVideo, Mochi) and of
their VAEs' own ``decode`` (Wan, HunyuanVideo, Mochi, LTX-Video, CogVideoX, Allegro), see ``dit_models.py``;
each at the lowest budget and with ``chunks=3``. Each runs with ``max|compiled - eager| <= 1e-5 * max|eager|``
(fp32): all of them capture (a :class:`~fxstream.errors.CaptureError` is a failure here, as any other error).
The planner's net (a pass that fails leaves the graph whole, with a :class:`PlanningWarning`) is an error
here: on these models every pass must plan, not fall back. The zoo models are held to the same rule, at
every budget, in ``test_api.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxstream
from dit_models import NAMES, build
from fxstream.errors import FxStreamError, PlanningWarning

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5
MODES = {"minimum": {}, "chunks=3": {"chunks": 3}}


def _sample(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


@pytest.fixture(scope="module")
def built_models():
    """The model of one name and its eager output, kept while that name's modes run (they are collected one after
    another): each is built and run eagerly once, not once per mode, and its second compile reuses the capture
    (:mod:`fxstream.capture` keeps it per module). Only the last name is kept."""
    kept: dict = {}

    def get(name: str):
        if name not in kept:
            kept.clear()
            built = build(name)
            with torch.no_grad():
                ref = _sample(built.module(*built.args, **built.kwargs))
            kept[name] = built, ref
        return kept[name]

    yield get
    kept.clear()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", NAMES)
def test_runs_exactly_or_fails_with_a_named_error(name, mode, built_models):
    built, ref = built_models(name)
    compiled = fxstream.compile(built.module, **MODES[mode])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanningWarning)
        try:
            with torch.no_grad():
                out = _sample(compiled(*built.args, **built.kwargs))
        except FxStreamError as e:  # a user problem, in words that name where
            pytest.fail(f"{type(e).__name__} at the lowest budget: {e}")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out - ref).abs().max().item()
    assert err <= RTOL * ref.abs().max().item(), f"max|diff| {err:.3e}"
    # grouping ran (every one of these has per-token or per-frame ops), or row streaming took the whole graph
    assert compiled.plan.candidate_groups > 0 or any(g.kind == "rows" for g in compiled.plan.groups)
