"""fxstream.measure: the activation peak of one call, counted from live tensor storage."""

from __future__ import annotations

import pytest
import torch

from fxstream.measure import Measurement, measure, timeline

MiB = 2**20
FLOATS_PER_MIB = MiB // 4


def test_peak_of_sequential_allocations_counts_the_largest_live_set():
    def fn(x):
        a = torch.empty(FLOATS_PER_MIB)  # 1 MiB
        del a
        b = torch.empty(2 * FLOATS_PER_MIB)  # 2 MiB, after the 1 MiB one is freed
        del b
        return x + 1  # the output, 4 KiB

    m = measure(fn, torch.zeros(1024))
    assert isinstance(m, Measurement)
    assert m.activation_peak_bytes == 2 * MiB
    assert m.device == "cpu"
    assert m.seconds >= 0
    assert torch.equal(m.output, torch.ones(1024))


def test_timeline_is_the_live_total_after_each_op_and_its_max_is_the_peak():
    def fn(x):
        a = torch.empty(FLOATS_PER_MIB)  # 1 MiB
        b = torch.empty(2 * FLOATS_PER_MIB)  # 3 MiB live
        del a, b
        return x + 1  # only the 4 KiB output

    x = torch.zeros(1024)
    assert timeline(fn, x) == [MiB, 3 * MiB, 4096]
    assert max(timeline(fn, x)) == measure(fn, x).activation_peak_bytes
    with pytest.raises(ValueError, match="CPU"):
        timeline(fn, torch.zeros(1, device="meta"))


def test_frees_are_seen_between_ops():
    def fn():
        a = torch.empty(FLOATS_PER_MIB)
        a = torch.empty(FLOATS_PER_MIB)  # rebinding frees the first once the second exists
        a = torch.empty(FLOATS_PER_MIB)
        return a

    assert measure(fn).activation_peak_bytes == 2 * MiB


def test_output_is_included():
    def fn():
        a = torch.empty(FLOATS_PER_MIB)
        b = torch.empty(FLOATS_PER_MIB)
        return a, b

    assert measure(fn).activation_peak_bytes == 2 * MiB


def test_preexisting_tensors_and_their_views_are_excluded():
    weight = torch.randn(512, 512)  # 1 MiB that exists before the call

    def fn(x):
        w = weight.t()  # a view of a pre-existing storage: no new memory
        y = x.view(-1)  # a view of the input
        return (w[:1] * 0).sum() + y.sum()

    m = measure(fn, torch.randn(512, 512))
    assert m.activation_peak_bytes < 16 * 1024


def test_views_of_new_storages_are_counted_once():
    def fn():
        a = torch.empty(FLOATS_PER_MIB)
        return a.view(2, -1), a[: FLOATS_PER_MIB // 2], a.t()

    assert measure(fn).activation_peak_bytes == MiB


def test_peak_includes_inputs_and_output_of_the_running_op():
    def fn(x):
        a = x * 2  # 1 MiB
        b = a + 1  # a and b are both live while the add runs
        return b

    assert measure(fn, torch.zeros(FLOATS_PER_MIB)).activation_peak_bytes == 2 * MiB


def test_module_runs_without_autograd():
    lin = torch.nn.Linear(256, 256)
    m = measure(lin, torch.randn(1024, 256))
    assert not m.output.requires_grad
    assert m.activation_peak_bytes == 1024 * 256 * 4


def test_rejects_an_unsupported_device():
    with pytest.raises(ValueError, match="meta"):
        measure(lambda x: x + 1, torch.empty(4, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_counts_allocations_during_the_call():
    x = torch.zeros(FLOATS_PER_MIB, device="cuda")

    def fn(x):
        a = x * 2
        b = a + 1
        return b

    m = measure(fn, x)
    assert m.device.startswith("cuda")
    assert 2 * MiB <= m.activation_peak_bytes <= 2 * MiB + 64 * 1024


def _eager_allocation(fn, *args) -> int:
    """Bytes the op allocates when run with no mode at all, as torch.profiler records it (the aten::linear
    event's own allocations, its children's included; the cases below free nothing inside the op)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    (event,) = [e for e in prof.events() if e.name == "aten::linear"]
    return event.cpu_memory_usage


@pytest.mark.parametrize("case", ["permuted, bias", "contiguous, bias", "permuted, no bias", "2-d strided"])
def test_a_linear_is_counted_as_eager_allocates_it(case):
    # Under a dispatch mode torch's linear adds its bias out of place (a second output) where eager adds in
    # place: Mochi's depth-to-space projection reads a permuted view, and its measured peak was 36 MiB over.
    torch.manual_seed(0)
    x = torch.randn(1, 32, 6, 16, 16)
    w, b = torch.randn(64, 32), torch.randn(64)
    if case == "2-d strided":
        x = x.reshape(32, -1).t()
    else:
        x = x.permute(0, 2, 3, 4, 1)
    if case == "contiguous, bias":
        x = x.contiguous()
    bias = None if case == "permuted, no bias" else b
    fn = lambda t: torch.nn.functional.linear(t, w, bias)  # noqa: E731
    m = measure(fn, x)
    assert torch.equal(m.output, fn(x))
    assert m.activation_peak_bytes == _eager_allocation(fn, x) == m.output.numel() * 4
