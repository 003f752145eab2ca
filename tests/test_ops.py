"""passes.ops, the op table: the one place that lists ATen overloads, and what its rows say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fxstream.capture import capture
from fxstream.runtime.ops import combine_partials
from passes import ops
from passes.memory import analyze_memory
from passes.ops import Alias

ROOT = Path(__file__).resolve().parent.parent
OVERLOAD = re.compile(r"\baten\.[A-Za-z_0-9]+\.[A-Za-z_0-9]+|torch\.ops\.")
aten = torch.ops.aten


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "passes").glob("*.py") if p.name != "ops.py"))
def test_no_pass_lists_overloads_of_its_own(path):
    text = (ROOT / "passes" / path).read_text()
    assert not OVERLOAD.findall(text), f"passes/{path} names {sorted(set(OVERLOAD.findall(text)))}"


def test_an_op_missing_from_the_table_is_a_barrier_everywhere():
    row = ops.info(aten.cumsum.default)
    assert row.dims is None and row.alias is Alias.NONE and not row.layout and row.family is None
    assert ops.info(object()) is row and ops.info([]) is row  # any target, even unhashable


def test_the_ops_fxstream_inserts_are_rows_of_the_table():
    assert ops.info(ops.PARTIAL).combine is combine_partials and ops.info(ops.PARTIAL).dims is not None
    assert ops.info(ops.APPLY).dims is not None


def test_every_convolution_overload_is_one_family():
    convs = [op for op, row in ops.TABLE.items() if row.family == "conv"]
    assert aten.conv2d.padding in convs and aten.convolution.default in convs
    assert all(ops.TABLE[op].anchor and ops.TABLE[op].dims is not None for op in convs)


def test_cuda_convolution_workspace_is_charged_for_string_padding_too():
    """The ``.padding`` overloads (``padding="same"``) are convolutions for the memory engine as well."""
    x = torch.randn(1, 8, 16, 16)
    peaks = {}
    for padding in (1, "same"):
        gm = capture(nn.Conv2d(8, 8, 3, padding=padding).eval().requires_grad_(False), x)
        conv = next(n for n in gm.graph.nodes if ops.of(n).family == "conv")
        assert conv.target is (aten.conv2d.padding if padding == "same" else aten.conv2d.default)
        peaks[padding] = analyze_memory(gm, lifetime="graph", target="cuda").activation_peak_bytes
    assert peaks["same"] == peaks[1] > 2 * x.numel() * 4  # input + output transposes on top of the output


def test_conv_params_reads_both_spellings():
    for padding, expected in ((1, [1, 1]), ("same", [1, 1]), ("valid", [0, 0])):
        gm = capture(nn.Conv2d(4, 4, 3, padding=padding, stride=1).eval(), torch.randn(1, 4, 8, 8))
        conv = next(n for n in gm.graph.nodes if ops.of(n).family == "conv")
        p = ops.conv_params(conv)
        assert p["padding"] == expected and p["kernel"] == [3, 3] and p["stride"] == [1, 1]
