"""Every Python block in README.md and docs/*.md runs as written, in a fresh interpreter, except the blocks
whose first line says ``# needs: ...`` (a download, a GPU): those are checked to compile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
TIMEOUT_S = 300


def _blocks() -> list[tuple[str, str]]:
    out = []
    for path in FILES:
        for i, m in enumerate(BLOCK.finditer(path.read_text())):
            out.append((f"{path.relative_to(ROOT)}#{i + 1}", m.group(1)))
    return out


BLOCKS = _blocks()


def test_the_docs_have_python_blocks():
    names = [name for name, _ in BLOCKS]
    assert any(n.startswith("README.md") for n in names) and any(n.startswith("docs/usage.md") for n in names)


@pytest.mark.parametrize("name, code", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_python_block_runs_as_written(name, code, tmp_path):
    compile(code, name, "exec")  # every block is valid Python
    if code.startswith("# needs:"):
        pytest.skip(code.splitlines()[0][2:])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FXSTREAM_PLAN_CACHE": "0", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"
