"""The benchmark scripts run end to end on tiny models (they are not otherwise exercised between releases)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    """Import ``benchmarks/<name>.py`` as a module (benchmarks/ is a folder of scripts, not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


@pytest.mark.usefixtures("one_thread")
def test_gpu_benchmark_tiny_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    argv = ["--tiny", "--device", "cpu", "--repeats", "1", "--models", "svd", "--out", str(out)]
    rc = _load("gpu").main(argv)
    assert rc == 0
    text = out.read_text()
    assert text.startswith("# fxstream GPU benchmark (tiny smoke run)")
    assert "- command: `" in text and "- machine: " in text and "- date: " in text
    variants = [r[1] for r in _table_rows(text, "svd")]
    assert "eager" in variants
    pipeline = [r[1] for r in _table_rows(text, "pipeline svd 4f 64x64")]
    assert pipeline == ["eager", "fxstream.optimize min"]
    assert "fxstream min" in variants and any(v.startswith("fxstream 8") for v in variants)
    assert "error" not in variants
    check = next(line for line in text.splitlines() if line.startswith("- key-chunked attention"))
    assert float(check.rsplit("float32 ", 1)[1].split(",")[0]) <= 1e-5
    assert "wrote" in capsys.readouterr().out


@pytest.mark.usefixtures("one_thread")
def test_plan_table_quick(tmp_path, capsys):
    out = tmp_path / "plan_table.md"
    rc = _load("plan_table").main(["--quick", "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "## Per model" in text and "## Whole pipeline" in text
    assert "- command: `" in text and "- machine: " in text
    (svd,) = _table_rows(text, "svd")
    (vae,) = _table_rows(text, "svd-vae-decoder")
    header = _table_rows(text, "model")[0]
    svd, vae = dict(zip(header, svd)), dict(zip(header, vae))
    # Tiny models: every budget in GiB fits unsliced; the minimum slices something and beats eager.
    assert all(svd[f"fxstream {b} GiB"].startswith("fits unsliced") for b in (16, 11, 8))
    assert svd["fxstream min"].endswith("groups)")
    # the decoder's minimum streams its tail by rows, as fxstream.compile plans it
    assert "groups + " in vae["fxstream min"] and vae["fxstream min"].endswith("row-streamed)")
    assert svd["eager + FF chunking"] != "-" and vae["eager + FF chunking"] == "-"
    assert float(svd["min vs eager"].rstrip("x")) < 1 and float(vae["min vs eager"].rstrip("x")) < 1
    (pipeline,) = _table_rows(text, "SVD (tiny models, full-size encoder weights)")
    assert "CLIP image encoder 1.18" in pipeline[1]
    assert "## Failures" not in text
    printed = capsys.readouterr().out
    assert "| svd " in printed and f"wrote {out}" in printed


def test_plan_table_rejects_unknown_model():
    with pytest.raises(SystemExit):
        _load("plan_table").main(["--quick", "--models", "nope"])


@pytest.mark.usefixtures("one_thread")
def test_vae_plan_measures_a_tiny_decode_exactly(tmp_path):
    out = tmp_path / "vae_plan.md"
    _load("vae_plan").main(["--tiny", "cogvideox-vae-decoder", "--models", "none", "--out", str(out)])
    text = out.read_text()
    assert "- command: `" in text and "- machine: " in text and "- commit: " in text
    (row,) = _table_rows(text, "cogvideox-vae-decoder")
    eager, low, predicted = (float(x) for x in row[2:5])
    assert low < eager and abs(low - predicted) <= 0.1 * predicted
    assert float(row[6]) <= 1e-5  # max relative error against eager's decode


@pytest.mark.usefixtures("one_thread")
def test_vae_tiling_cpu_tiny_tiling_differs_and_fxstream_is_exact(tmp_path):
    out = tmp_path / "vae_tiling_cpu.md"
    _load("vae_tiling_cpu").main(["--models", "hunyuanvideo-vae-decoder", "--size", "tiny", "--repeats", "1",
                                  "--out", str(out)])
    text = out.read_text()
    assert "- command: `" in text and "- machine: " in text and "- commit: " in text
    header = _table_rows(text, "model")[0]
    found = _table_rows(text, "hunyuanvideo-vae-decoder")
    rows = {r[1]: dict(zip(header, r)) for r in found if len(r) == len(header)}
    assert list(rows) == ["eager", "diffusers tiling", "fxstream min", "fxstream middle"]
    # 16 px tiles of the 32x32 frames and windows of frames: tiling changes the decode, fxstream does not
    assert float(rows["diffusers tiling"]["rel. error"]) > 1e-3
    for variant in ("fxstream min", "fxstream middle"):
        assert float(rows[variant]["rel. error"]) <= 1e-5
        assert float(rows[variant]["activation peak MiB"]) < float(rows["eager"]["activation peak MiB"])
    assert rows["fxstream min"]["row-streamed (bands)"] != "-"
    (settings,) = [r[-1] for r in found if len(r) != len(header)]  # the tile settings table
    assert "enable_tiling(tile_sample_min_height=16" in settings and "use_framewise_decoding" in settings


@pytest.mark.usefixtures("one_thread")
def test_dit_plan_medium_measures_a_transformer(tmp_path):
    out = tmp_path / "dit_medium_cpu.md"
    _load("dit_plan").main(["--medium", "--models", "mochi", "--out", str(out)])
    text = out.read_text()
    assert "- command: `" in text and "- machine: " in text
    header = _table_rows(text, "model")[0]
    (row,) = _table_rows(text, "mochi")
    row = dict(zip(header, row))
    assert float(row["fxstream min MiB"]) < float(row["eager MiB"])
    assert float(row["max rel. error"]) <= 1e-5
