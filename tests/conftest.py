"""Shared pytest setup: make the repository root importable without installing the package."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Tests plan from scratch: the on-disk plan cache (fxstream.plan_cache) is off unless a test turns it on.
os.environ["FXSTREAM_PLAN_CACHE"] = "0"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# diffusers switches every model to its PEFT backend when peft is importable, and its forwards then run about
# 25% slower on the tiny models the suite is made of; only the LoRA test needs the backend, and it runs it in a
# process of its own (tests/test_guards.py). A None entry makes peft unimportable here, for diffusers too.
if "peft" not in sys.modules:
    sys.modules["peft"] = None
# Under pytest-xdist (`-n 2`, what .ci/run uses) each worker takes one core: intra-op threads of two workers
# would compete for the same cores (see `one_thread`).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the duration of a test module.

    Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads that
    spin-wait for a busy core make a 0.05 s forward take seconds.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def animatediff(tmp_path_factory) -> str:
    """A folder holding the tiny AnimateDiff pipeline, saved with ``save_pretrained`` (load it with
    ``tests.pipes.load``); built once per process: the tests only read it."""
    from fxstream import pipelines

    folder = tmp_path_factory.mktemp("animatediff")
    pipelines.build("animatediff").save_pretrained(folder)
    return str(folder)
