"""Layers point down: the bottom layer (what runs inside compiled graphs, and the error types) imports torch
only; passes/ may import the bottom layer, never the face (capture, module, pipelines, cli...)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOTTOM = sorted(["fxstream/errors.py", *(str(p.relative_to(ROOT)) for p in (ROOT / "fxstream/runtime").glob("*.py"))])
PASSES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "passes").glob("*.py"))


def _imports(path: str) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports included)."""
    tree = ast.parse((ROOT / path).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _bottom(module: str) -> bool:
    return module in ("fxstream", "fxstream.errors") or module == "fxstream.runtime" or module.startswith(
        "fxstream.runtime.")


@pytest.mark.parametrize("path", BOTTOM)
def test_bottom_layer_imports_torch_and_itself_only(path):
    ours = {m for m in _imports(path) if m.split(".")[0] in ("fxstream", "passes", "diffusers")}
    assert all(_bottom(m) for m in ours), f"{path} imports {sorted(m for m in ours if not _bottom(m))}"


@pytest.mark.parametrize("path", PASSES)
def test_passes_never_import_the_face(path):
    face = {m for m in _imports(path) if m.split(".")[0] in ("fxstream", "diffusers") and not _bottom(m)}
    assert not face, f"{path} imports {sorted(face)}"


def test_bottom_layer_loads_without_passes_or_the_face():
    modules = [p.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for p in BOTTOM]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in ('fxstream', 'passes', 'diffusers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = out.split()
    assert loaded and all(_bottom(m) for m in loaded), [m for m in loaded if not _bottom(m)]


def test_public_functions_keep_their_names_after_their_modules_load():
    code = (
        "import fxstream.capture, fxstream.measure, fxstream.calibrate, fxstream\n"
        "print(all(callable(f) and not isinstance(f, type(fxstream)) for f in "
        "(fxstream.capture, fxstream.measure, fxstream.calibrate)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
