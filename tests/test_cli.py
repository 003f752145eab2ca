"""The ``fxstream`` command line: ``plan`` on full-size (meta) and tiny models, JSON, errors, exit codes."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

from fxstream import cli, models
from fxstream.errors import CaptureError
from passes.memory import MemoryTimeline, format_bytes
from passes.plan import Plan

# A full-size architecture at a small video size: the real SD-1.5 VAE decoder on meta, captured in a second.
FULL_SMALL = ["plan", "--model", "sd-vae-decoder", "--frames", "2", "--height", "64", "--width", "64"]
# A tiny model whose minimum peak is far below its baseline, so a budget between them makes the planner slice:
# baseline 10.4 MiB, minimum 2.2 MiB (weights included), budget 5.1 MiB.
TINY_BUDGET = ["plan", "--model", "sd-vae-decoder", "--size", "tiny", "--budget-gb", "0.005"]


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def full_baseline(tmp_path_factory):
    """(code, stdout, stderr, JSON) of a baseline-only run on the full-size SD VAE decoder."""
    return _run_once(FULL_SMALL, tmp_path_factory.mktemp("cli") / "baseline.json")


@pytest.fixture(scope="module")
def tiny_budget(tmp_path_factory):
    """(code, stdout, stderr, JSON) of a planned run on the tiny SD VAE decoder."""
    return _run_once(TINY_BUDGET, tmp_path_factory.mktemp("cli") / "budget.json")


def _run_once(argv: list[str], path) -> tuple[int, str, str, dict]:
    # Module-scoped fixtures cannot use capsys: redirect by hand.
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main([*argv, "--json", str(path)])
    return code, out.getvalue(), err.getvalue(), json.loads(path.read_text())


def test_zoo_constants_match():
    # cli.py lists these itself so that --help and argument errors never import torch and diffusers.
    assert cli.MODELS == tuple(models.names())
    assert cli.VAE_SCALE_FACTOR == models.VAE_SCALE_FACTOR


def _row(out: str, label: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"| {label} "))


def test_baseline_prints_tables(full_baseline):
    code, out, err, data = full_baseline
    assert code == 0
    assert "sd-vae-decoder: diffusers Decoder, 49,490,179 parameters, size full" in out
    assert "2 frames 64x64, float16, no guidance (VAE decoder), target cuda" in out
    # The tables print what the analysis found (the JSON holds the same timeline).
    baseline = MemoryTimeline.from_dict(data["baseline"])
    assert format_bytes(baseline.weight_bytes) in _row(out, "weights")
    assert format_bytes(baseline.activation_peak_bytes) in _row(out, "activation peak")
    assert format_bytes(baseline.weight_bytes + baseline.activation_peak_bytes) in _row(
        out, "total (weights + activations)")
    # in the user's words: the module and the op, no graph node names (those with --verbose)
    assert f"baseline peak in '{baseline.peak_module_path}'" in out and baseline.peak_node not in out
    live = out.split("largest tensors live at the baseline peak")[1].split("\n\n")[0]
    first = baseline.live_at_peak[0]
    assert re.search(rf"^\| {first.node.rsplit('_', 1)[0]} +\| {re.escape(first.module_path)} ", live, re.MULTILINE)
    blocks = out.split("activation peak per block")[1].split("\n\n")[0]
    assert [b.block for b in baseline.blocks][-4:] == ["up_blocks.3", "conv_norm_out", "conv_act", "conv_out"]
    assert all(f"| {b.block} " in blocks for b in baseline.blocks)
    assert "planned" not in out  # no budget, no plan: the baseline only
    suggestion = next(line for line in out.splitlines() if line.startswith("to plan slicing"))
    assert suggestion.startswith("to plan slicing under a memory budget: fxstream " + " ".join(FULL_SMALL))
    assert suggestion.endswith("--budget-gb GIB")
    assert "capturing sd-vae-decoder (full, meta) ... done in" in err


def test_baseline_json(full_baseline):
    _, out, _, data = full_baseline
    assert set(data) == {"fxstream", "model", "budget_bytes", "chunks", "baseline", "plan", "planned"}
    assert data["model"] == {"name": "sd-vae-decoder", "size": "full", "frames": 2, "height": 64, "width": 64,
                             "dtype": "float16", "cfg": False, "target": "cuda", "parameters": 49_490_179,
                             "storage_dtype": None}
    assert data["plan"] is None and data["planned"] is None and data["budget_bytes"] is None
    baseline = MemoryTimeline.from_dict(data["baseline"])
    assert baseline.lifetime == "eager" and baseline.target == "cuda"
    assert baseline.weight_bytes >= 2 * 49_490_179  # fp16 parameters
    assert baseline.activation_peak_bytes == max(baseline.live_bytes) > 0
    assert baseline.peak_node in baseline.nodes and baseline.peak_module_path
    assert "\nwrote " in out


def test_layerwise_casting_counts_the_weights_at_their_stored_size(full_baseline, tmp_path):
    code, out, _, data = _run_once([*FULL_SMALL, "--layerwise-casting", "fp8"], tmp_path / "fp8.json")
    assert code == 0 and "weights stored as float8_e4m3fn" in out
    assert data["model"]["storage_dtype"] == "float8_e4m3fn"
    plain = MemoryTimeline.from_dict(full_baseline[3]["baseline"])
    cast = MemoryTimeline.from_dict(data["baseline"])
    # the decoder's convolutions store 1 byte per weight instead of 2 (its norms stay float16)
    assert 0.5 * plain.weight_bytes <= cast.weight_bytes < 0.6 * plain.weight_bytes
    # the transient float16 copy of a layer's weights shows as an activation, no more than the largest layer
    assert cast.activation_peak_bytes >= plain.activation_peak_bytes


def test_budget_plans_beside_baseline(tiny_budget):
    code, out, err, data = tiny_budget
    assert code == 0, err
    header = next(line for line in out.splitlines() if "baseline (eager)" in line)
    assert header.rstrip(" |").endswith("planned")
    assert "planned peak in" in out and "budget 5.12 MiB" in out
    assert "largest tensors live at the planned peak" in out
    assert "sliced operator groups" in out and "| ratio" in out
    assert "capturing and planning sd-vae-decoder (tiny, cpu) for budget 0.005 GiB ... done in" in err
    plan = Plan.from_dict(data["plan"])
    assert plan.budget_bytes == data["budget_bytes"] == int(0.005 * 2**30)
    assert plan.sliced_groups and plan.predicted_peak_bytes <= plan.budget_bytes < plan.baseline_peak_bytes
    planned = MemoryTimeline.from_dict(data["planned"])
    assert planned.activation_peak_bytes == plan.predicted_activation_peak_bytes
    assert any(line.startswith("total: ") and "baseline -> " in line for line in out.splitlines())


def test_verbose_names_the_graph_nodes(capsys):
    code, out, _ = run(capsys, [*TINY_BUDGET, "--verbose"])
    assert code == 0
    assert re.search(r"^baseline peak at '\w+' in '", out, re.MULTILINE)
    assert "| kind " in out and "| axis " in out and "| tensor " in out
    code, plain, _ = run(capsys, TINY_BUDGET)
    assert "| sliced along " in plain and "| kind " not in plain and "| made by " in plain


def test_forced_chunks_on_full_size(capsys):
    code, out, _ = run(capsys, [*FULL_SMALL, "--chunks", "2", "--top", "3"])
    assert code == 0
    assert "2 slices per operator group (forced)" in out
    assert "planned" in next(line for line in out.splitlines() if "baseline (eager)" in line)
    live = out.split("largest tensors live at the planned peak")[1].split("\n\n")[0]
    assert len([line for line in live.splitlines() if line.startswith("| ") and "made by" not in line]) <= 3


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["plan", "--model", "sdxl"], "argument --model: invalid choice: 'sdxl'"),
        (["plan", "--frames", "0"], "argument --frames: must be positive, got 0"),
        (["plan", "--frames", "two"], "argument --frames: expected a positive integer"),
        (["plan", "--height", "100"], "argument --height: must be divisible by 8"),
        (["plan", "--width", "-64"], "argument --width: must be positive"),
        (["plan", "--budget-gb", "0"], "argument --budget-gb: must be a positive finite number"),
        (["plan", "--budget-gb", "-3"], "argument --budget-gb: must be a positive finite number"),
        (["plan", "--budget-gb", "nan"], "argument --budget-gb: must be a positive finite number"),
        (["plan", "--chunks", "0"], "argument --chunks: must be positive"),
        (["plan", "--budget-gb", "8", "--chunks", "2"], "not allowed with argument"),
        (["plan", "--dtype", "int8"], "argument --dtype: invalid choice"),
        (["plan", "--json", "/nonexistent-dir/plan.json"], "argument --json: cannot write"),
        (["plan", "--rehash", "--full-steps", "26"], "argument --full-steps: 26 is more than --steps 25"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, fragment):
    code, out, err = run(capsys, argv)
    assert code == 2
    assert out == ""
    assert err.startswith("fxstream: error: ") and err.count("\n") == 1
    assert fragment in err


def test_model_build_value_error_is_one_line(capsys):
    # Checked by fxstream.models.build, not the parser: AnimateDiff's motion modules take at most 32 frames.
    code, out, err = run(capsys, ["plan", "--model", "animatediff", "--size", "tiny", "--frames", "40"])
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("fxstream: error: frames: ") and "32" in last and "40" in last
    assert out == ""


def test_infeasible_budget_exits_2(capsys):
    code, out, err = run(capsys, [*FULL_SMALL, "--budget-gb", "0.05"])
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("fxstream: error: budget 51.20 MiB is below the smallest peak slicing can reach")
    assert "failed after" in err and out == ""


def test_other_fxstream_errors_exit_1(capsys, monkeypatch):
    import fxstream.analysis

    def fail(*_args, **_kwargs):
        raise CaptureError("could not capture Decoder: failed in module 'mid_block'\nat some op",
                           module_path="mid_block")

    monkeypatch.setattr(fxstream.analysis, "estimate", fail)
    code, _, err = run(capsys, FULL_SMALL)
    assert code == 1
    one_line = "could not capture Decoder: failed in module 'mid_block' at some op"
    assert err.splitlines()[-1] == f"fxstream: error: {one_line}"


def test_rehash_lists_cache_points(capsys):
    code, out, err = run(capsys, ["plan", "--model", "svd", "--size", "tiny", "--rehash", "--steps", "20",
                                  "--full-steps", "10"])
    assert code == 0, err
    table = out.split("Step Rehash cache points:")[1]
    assert "FLOPs saved over 20 steps with 10 full" in table
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines() if "| up_blocks" in line}
    last = rows["up_blocks.1.attentions.1"]
    skipped = float(last[3].strip().rstrip("%")) / 100
    assert skipped > 0.99
    assert float(last[4].strip().rstrip("x")) == pytest.approx(20 / (10 + 10 * (1 - skipped)), abs=0.01)
    assert any("DeepCache-style" in name for name in rows)
    # a VAE decoder runs once per generation: nothing to reuse across steps
    code, out, _ = run(capsys, ["plan", "--model", "sd-vae-decoder", "--size", "tiny", "--rehash"])
    assert code == 0 and "Step Rehash: applies to UNets" in out


def test_help_and_version(capsys):
    code, out, _ = run(capsys, ["plan", "--help"])
    assert code == 0 and "--budget-gb GIB" in out and "svd-xt" in out
    code, out, _ = run(capsys, ["--version"])
    assert code == 0 and out.startswith("fxstream ")


def test_progress_line_without_terminal():
    stream = io.StringIO()
    with cli.progress("capturing x (full, meta)", stream):
        pass
    assert stream.getvalue().startswith("capturing x (full, meta) ... done in ")
    stream = io.StringIO()
    with pytest.raises(RuntimeError), cli.progress("capturing y", stream):
        raise RuntimeError("boom")
    assert stream.getvalue().startswith("capturing y ... failed after ")
    assert stream.getvalue().count("\n") == 1


def test_console_entry_in_subprocess(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "fxstream", "plan", "--model", "sd-vae-decoder", "--size", "tiny", "--no-cfg"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sd-vae-decoder: diffusers Decoder" in proc.stdout and "| activation peak" in proc.stdout
    assert "capturing sd-vae-decoder (tiny, cpu) ... done in" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "fxstream", "plan", "--chunks", "-1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("fxstream: error: argument --chunks")
