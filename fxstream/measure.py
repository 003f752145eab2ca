"""Measure the activation memory of one call: what ``passes.memory`` predicts, counted for real.

"Activation memory" means the bytes of tensor storage created during the call and alive at the same time,
the call's output included; weights, inputs and anything else that existed before the call are not counted.

- CPU: a ``TorchDispatchMode`` sees every ATen op. After each op it adds the op's new output storages to the
  live set, drops the storages that have died (weak references see the frees as soon as the last reference
  goes), and samples the sum. The sample after an op therefore holds the op's inputs and its output
  together, as the estimator does. Buffers an op allocates and frees inside its own kernel (e.g. CPU flash
  attention's per-thread blocks) are not tensors and are not seen. The torch profiler is not used: on CPU
  it misses frees (``shared/reference/CAPTURE-NOTES.md``, pitfall 7). A dispatch mode changes what one
  composite op does: torch's ``linear`` then adds its bias out of place (composite compliance takes every tensor
  for a subclass under a mode), allocating its output twice where eager adds in place; such calls run as eager
  runs them (:class:`_AsEager`).
- CUDA: the caching allocator's own counters, ``max_memory_allocated`` minus ``memory_allocated`` before.
  They include what libraries allocate through it (cuDNN's convolution workspaces, which the estimator
  models; cuBLAS's workspace on its first use, so run the call once before measuring).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Measurement:
    """One measured call.

    activation_peak_bytes: the largest total of storage created during the call and alive at once.
    seconds: wall-clock time of the call (on CPU it includes the tracking overhead).
    device: where the call ran, e.g. ``"cpu"`` or ``"cuda:0"``.
    output: what the call returned.
    """

    activation_peak_bytes: int
    seconds: float
    device: str
    output: Any


class _LiveStorageTracker(TorchDispatchMode):
    """Tracks storages first seen as an op output during the call, and the peak of their total bytes."""

    def __init__(self, sample: bool = False) -> None:
        super().__init__()
        # with ``sample``: the live total after every op (swept), for a memory timeline
        self.samples: list[int] | None = [] if sample else None
        # Storages that existed before the call (weights, inputs): seen as an op input before an op made them.
        # A weak reference keeps the storage's bookkeeping object alive, so its address (which weak
        # references compare by) is not reused while the reference is held.
        self._preexisting: set[StorageWeakRef] = set()
        # Storages created during the call and their sizes.
        self._live: dict[StorageWeakRef, int] = {}
        self._live_bytes = 0
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in self._live:
                self._preexisting.add(ref)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref in self._live or ref in self._preexisting:
                continue
            self._live[ref] = storage.nbytes()
            self._live_bytes += storage.nbytes()
        # ``_live_bytes`` still counts storages freed since the last sweep, so it bounds the true total from
        # above: only when it passes the peak must the dead be swept to learn whether the peak really rose.
        if self._live_bytes > self.peak_bytes or self.samples is not None:
            self._sweep_dead()
            self.peak_bytes = max(self.peak_bytes, self._live_bytes)
        if self.samples is not None:
            self.samples.append(self._live_bytes)
        return out

    def _sweep_dead(self) -> None:
        for ref in [ref for ref in self._live if ref.expired()]:
            self._live_bytes -= self._live.pop(ref)


_LINEARS = (torch.nn.functional.linear, torch.ops.aten.linear.default)
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # (a tensor subclass's own linear is its business)


class _AsEager(TorchFunctionMode):
    """Runs the calls a dispatch mode would change as eager runs them, so that the tracker below counts eager's
    allocations. torch's ``linear`` with a bias flattens its input into one ``addmm`` where it can (2-d input,
    or contiguous); otherwise it runs ``matmul(input, weight.t())`` and adds the bias in place, except under a
    dispatch mode, where it adds out of place (a second output-sized tensor: the measured peak of Mochi's
    depth-to-space projection, whose input is a permuted view, was its output over what eager allocates). The
    same ops in the same order: the values are eager's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEARS:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (bias is not None and all(type(t) in _PLAIN for t in (x, weight, bias))
                    and x.layout == torch.strided and x.dim() != 2
                    and not (x.is_contiguous() and (x.dim() == 3 or bias.dim() == 1))
                    and not (x.dim() == 3 and os.environ.get("TORCH_LINEAR_FLATTEN_3D"))):
                return torch.matmul(x, weight.t()).add_(bias)
        return func(*args, **kwargs)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _device_of(fn: Callable, args: tuple, kwargs: dict) -> torch.device:
    """The device of the first tensor argument, else of the first parameter when ``fn`` is a module."""
    for t in _tensors((args, kwargs)):
        return t.device
    if isinstance(fn, torch.nn.Module):
        for p in fn.parameters():
            return p.device
    return torch.device("cpu")


def measure(fn: Callable, *args: Any, **kwargs: Any) -> Measurement:
    """Run ``fn(*args, **kwargs)`` once under ``torch.no_grad`` and measure its activation peak.

    The peak counts storage created during the call, its output included (see the module docstring); run it
    on inputs that already exist so they are not counted.
    """
    device = _device_of(fn, args, kwargs)
    if device.type == "cuda":
        return _measure_cuda(fn, device, args, kwargs)
    if device.type != "cpu":
        raise ValueError(f"measure: cannot measure on device '{device}' (cpu or cuda only)")
    tracker = _LiveStorageTracker()
    start = time.perf_counter()
    with torch.no_grad(), _AsEager(), tracker:
        output = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    return Measurement(tracker.peak_bytes, seconds, str(device), output)


def timeline(fn: Callable, *args: Any, **kwargs: Any) -> list[int]:
    """Run ``fn(*args, **kwargs)`` once on the CPU under ``torch.no_grad``: the live activation bytes after each
    ATen operator, counted as :func:`measure` counts them (its peak is the largest of these)."""
    device = _device_of(fn, args, kwargs)
    if device.type != "cpu":
        raise ValueError(f"timeline: counts CPU calls only, not '{device}'")
    tracker = _LiveStorageTracker(sample=True)
    with torch.no_grad(), _AsEager(), tracker:
        fn(*args, **kwargs)
    return tracker.samples


def _measure_cuda(fn: Callable, device: torch.device, args: tuple, kwargs: dict) -> Measurement:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before
    return Measurement(peak, seconds, str(device), output)
