"""StreamlinedModule: the drop-in replacement ``fxstream.compile`` returns.

It is called exactly like the original module and returns the same types. On the first call with a new input
signature (tensor shapes, dtypes and devices, and the values of non-tensor arguments) it captures the module,
groups its operators, chooses slice counts for the budget and keeps the sliced GraphModule; later calls with
that signature reuse it. Attributes the module does not have (``config``, ``dtype``, ``device``...) are read
from the original, whose parameters it shares.

It stays faithful for the module's whole life:

- Guards (:mod:`fxstream.guards`): every call checks the module tree, its weights' identities, devices and
  dtypes and its plain attributes against what the graphs were captured from; on any change (a LoRA loaded,
  scaled or fused, a diffusers switch, ``.to()``, ``load_state_dict(assign=True)``) every graph is dropped, with
  the old tensors it held, and the call compiles again (a saved plan is replayed from the plan cache).
  After ``MAX_RECOMPILES`` such changes the module runs the original, with a warning.
- Where it would not help, it runs the original module itself: a plan that slices nothing while eager fits the
  budget, or at the least memory where the graph's shorter lifetimes would not save any (no overhead), and
  calls that need gradients (fxstream's sliced ops have no backward; one warning).
- Calls that differ only in ``return_dict`` or in the timestep's form (a 1-D timestep of equal values, an
  integer tensor) share one graph, for diffusers models; at most ``MAX_SIGNATURES`` input signatures stay
  compiled (least recently used dropped first).
- ``state_dict`` / ``load_state_dict`` use the original's keys; it pickles, saves and deep-copies (without its
  compiled graphs, which are rebuilt on the next call); the first call from several threads compiles once.
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from fxstream.capture import TIMESTEP_NAMES, capture, normalize_inputs, signature_of
from fxstream.runtime.rehash import FeatureCache, RehashConfig, RehashController
from passes.memory import MemoryTimeline, format_bytes
from fxstream import plan_cache
from fxstream import guards, hooks
from fxstream.errors import CaptureError, EagerFallbackWarning, PlanMismatchError
from passes.pipeline import PartialGraph, PlanRequest
from passes.pipeline import plan as plan_graph
from passes.pipeline import replay as replay_graph
from passes.plan import Plan


@dataclass
class CompiledEntry:
    """One input signature's compiled graph and what was decided for it."""

    graph_module: torch.fx.GraphModule
    plan: Plan
    baseline: MemoryTimeline
    planned: MemoryTimeline
    compile_seconds: float
    partial: PartialGraph | None = None  # the rehash step's graph, when Step Rehash is on

    @property
    def runs_original(self) -> bool:
        """True when calls run the original module instead of the graph: the plan slices nothing, streams
        nothing and rehashes nothing, and eager fits the budget, or, asked for the least memory, the graph's
        own lifetimes would not need less than eager (the graph would only add overhead)."""
        plan = self.plan
        if plan.budget_bytes is None:
            fits = plan.predicted_peak_bytes >= plan.baseline_peak_bytes
        else:
            fits = plan.baseline_peak_bytes <= plan.budget_bytes
        return not plan.sliced_groups and plan.rehash is None and self.partial is None and fits


def describe_signature(args: tuple) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


def build_plan(
    module: nn.Module,
    args: tuple,
    *,
    budget_bytes: int | None,
    chunks: int | None = None,
    target: str | None = None,
    kwargs: dict | None = None,
    rehash: RehashConfig | None = None,
    cache: FeatureCache | None = None,
    replay: Plan | None = None,
    hint: Plan | None = None,
) -> CompiledEntry:
    """Capture ``module`` on normalised ``args`` (and keyword-only ``kwargs``) and plan it with the one planner,
    :func:`passes.pipeline.plan`: for the budget (or ``chunks`` everywhere); with ``rehash``, the full graph
    stores the cache point's value in ``cache`` and a partial graph for rehash steps is planned too.

    With ``replay``, the saved plan is rebuilt instead (:func:`passes.pipeline.replay`; PlanMismatchError when
    it does not fit). Otherwise ``hint`` (the plan this signature had before the module changed) and then the
    on-disk plan cache (:mod:`fxstream.plan_cache`) are tried first, and the cache is written after planning.
    """
    start = time.perf_counter()
    kwargs = kwargs or {}
    request = request_for(args, budget_bytes=budget_bytes, chunks=chunks, target=target, rehash=rehash)
    cache_key = None
    candidates = [replay] if replay is not None else [hint] if hint is not None else []
    if replay is None and plan_cache.enabled():
        cache_key = plan_cache.key(module, args, kwargs, request)
        entry = plan_cache.load(cache_key)
        if entry is not None:
            candidates.append(entry[0])
    gm = capture(module, *args, **kwargs)
    planned = None
    for stored in candidates:
        try:
            planned = replay_graph(gm, stored, request, cache=cache)
            break
        except PlanMismatchError:
            if replay is not None:
                raise
            # a plan for another graph (the module or its code changed): the next candidate, or plan again
    if planned is None:
        planned = plan_graph(gm, request, cache=cache)
        if cache_key is not None and not planned.plan.notes:
            plan_cache.save(cache_key, planned.plan, planned.baseline, planned.planned)
    # group offloading: the planned graphs move each group in just before its weights are read, out after
    hooks.place_moves(planned.graph_module, module)
    if planned.partial is not None:
        hooks.place_moves(planned.partial.graph_module, module)
    return CompiledEntry(planned.graph_module, planned.plan, planned.baseline, planned.planned,
                         time.perf_counter() - start, planned.partial)


def request_for(args: tuple, *, budget_bytes: int | None, chunks: int | None, target: str | None,
                rehash: RehashConfig | None) -> PlanRequest:
    """The planner's request for a call with normalised ``args`` (target: the inputs' device if None)."""
    return PlanRequest(budget_bytes=budget_bytes, chunks=chunks, target=target or target_of(args),
                       signature=describe_signature(args), rehash=rehash)


def request_of(plan: Plan) -> dict:
    """The planning options a saved Plan was made with, as :func:`build_plan` takes them."""
    rehash = plan.rehash.config if plan.rehash is not None else None
    return dict(budget_bytes=plan.budget_bytes, target=plan.target, rehash=rehash)


def _timestep_index(module: nn.Module) -> int | None:
    """Position of the timestep argument in the normalised call (see ``normalize_inputs``)."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    for name in TIMESTEP_NAMES:
        if name in params:
            return params.index(name)
    return None


def install(module: nn.Module, compiled: StreamlinedModule) -> None:
    """Make calls of ``module`` itself run ``compiled`` (what ``fxstream.optimize`` does to a pipeline's
    components): ``module`` stays the object it was, so everything that reads it as itself (its class, its
    state_dict, diffusers' adapter and switch APIs, saving) sees the original. The compiled call sits where
    ``nn.Module.compile()`` puts torch.compile's, and capture empties that slot while it traces."""
    if compiled.original is not module:
        raise ValueError("install: the compiled module must wrap the module it is installed on")
    module.__dict__["_compiled_call_impl"] = compiled


def installed(module: nn.Module) -> StreamlinedModule | None:
    """The compiled module :func:`install` put on ``module``, or None."""
    found = module.__dict__.get("_compiled_call_impl")
    return found if isinstance(found, StreamlinedModule) else None


def uninstall(module: nn.Module) -> None:
    """Undo :func:`install`: calls of ``module`` run its own forward again."""
    if installed(module) is not None:
        module.__dict__["_compiled_call_impl"] = None


def refuse_torch_compiled(module: nn.Module, name: str) -> None:
    """ValueError for a module already under torch.compile: compiling it again would lose one of the two
    (fxstream captures the plain module). Compile with fxstream first, then torch.compile the result."""
    wrapped = type(module).__name__ == "OptimizedModule" and "_orig_mod" in module._modules
    in_place = module.__dict__.get("_compiled_call_impl") is not None and installed(module) is None
    if wrapped or in_place:
        raise ValueError(f"{name} is compiled with torch.compile: give fxstream the plain module (then "
                         "torch.compile what fxstream returns, if you want both)")


def _return_dict_index(module: nn.Module) -> int | None:
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("return_dict") if "return_dict" in params else None


def _is_diffusers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("diffusers.")


def _broadcasts_timestep(module: nn.Module) -> bool:
    """diffusers' UNets turn a 0-d timestep into one per batch item (``timesteps[None].expand(batch)``) and
    embed it after ``.float()``; the video transformers (Wan, CogVideoX, HunyuanVideo, ...) do not: they
    assert a 1-D timestep, or use it per token."""
    return type(module).__module__.startswith("diffusers.models.unets.")


# Integers a float32 holds exactly: a timestep in this range converts without rounding.
_EXACT_FLOAT32_INTEGERS = 2**24


def _canonical_timestep(t: Any) -> Any:
    """One 0-d float32 timestep for a tensor of equal values that the diffusers models treat the same: they
    broadcast a timestep to the batch (a 1-D timestep of one repeated value is the same as a 0-d one) and embed
    it after ``.float()`` (an integer timestep is the same as its float32). Anything else is left as it is."""
    if not isinstance(t, torch.Tensor) or t.ndim > 1 or t.numel() == 0 or t.device.type == "meta":
        return t
    if t.ndim == 0 and t.dtype == torch.float32:
        return t
    first = t.reshape(-1)[0]
    if t.numel() > 1 and not bool((t == first).all()):
        return t
    if t.dtype == torch.float32:
        return first
    if t.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        if abs(int(first)) < _EXACT_FLOAT32_INTEGERS:
            return first.to(torch.float32)
    return t


def _needs_grad(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether this call records gradients: grad mode on, and an input or a parameter requires grad."""
    if not torch.is_grad_enabled():
        return False
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())):
        return True
    return any(p.requires_grad for p in module.parameters())


def _drop_original_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook of a StreamlinedModule: ``prefix + "original." + k`` becomes ``prefix + k``."""
    inner = prefix + "original."
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + k[len(inner):]] = state_dict.pop(k)
    metadata = getattr(state_dict, "_metadata", None)  # per-module versions, keyed by module path
    if metadata is not None:
        for k in [k for k in metadata if k.startswith(inner) or k == inner[:-1]]:
            metadata[prefix[:-1] if k == inner[:-1] else prefix + k[len(inner):]] = metadata.pop(k)


def _add_original_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                         missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook of a StreamlinedModule: the original's keys load into ``original``."""
    inner = prefix + "original."
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + k[len(prefix):]] = state_dict.pop(k)


def target_of(args: tuple) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return "cuda" if a.device.type in ("cuda", "meta") else "cpu"
    return "cpu"


# At most this many input signatures stay compiled per module; the least recently used is dropped beyond it (a
# pipeline uses one or two: the denoiser's, and a decode chunk's; each holds a graph and its plan).
MAX_SIGNATURES = 8
# Changes of the module after which it stops recompiling and runs the original (as torch.compile's recompile
# limit): something that changes on every call would otherwise recompile on every call.
MAX_RECOMPILES = 8


class StreamlinedModule(nn.Module):
    """A module compiled by fxstream: same call, same outputs, less memory. See :func:`fxstream.compile`."""

    def __init__(self, module: nn.Module, *, budget_bytes: int | None, chunks: int | None, target: str | None,
                 rehash: RehashConfig | None = None, replay: Plan | None = None, backend: str | None = None):
        super().__init__()
        self.original = module
        self._fx_backend = backend  # None: the planned graph runs eager; "inductor": its slice bodies compiled
        self._fx_replay = replay  # a saved Plan, rebuilt on the first call instead of planning
        self._fx_budget_bytes = budget_bytes
        self._fx_chunks = chunks
        self._fx_target = target
        self._fx_rehash = RehashController(rehash) if rehash is not None else None
        self._fx_timestep_index = _timestep_index(module)
        self._fx_return_dict = _return_dict_index(module)
        self._fx_init_state()
        # the original's keys, both ways (a plain checkpoint loads; a saved one loads into the plain module)
        self.register_state_dict_post_hook(_drop_original_prefix)
        self.register_load_state_dict_pre_hook(_add_original_prefix)

    def _fx_init_state(self) -> None:
        """What is rebuilt rather than saved: compiled graphs, the guard, the lock."""
        self._fx_cache: OrderedDict[tuple, CompiledEntry] = OrderedDict()
        self._fx_last: CompiledEntry | None = None
        self._fx_guard: guards.Fingerprint | None = None
        self._fx_recompiles: list[str] = []  # what changed, each time the guard dropped the graphs
        self._fx_previous: dict[tuple, Plan] = {}  # the dropped graphs' plans: replayed first when they fit
        self._fx_uncapturable: guards.Fingerprint | None = None  # the module as it was when capture failed
        self._fx_lock = threading.RLock()
        self._fx_warned: set[str] = set()
        self._fx_tuple_outputs = True  # the return_dict=True graph's output has to_tuple() (see _canonical)

    # -- calling -----------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if _needs_grad(self.original, args, kwargs):
            self._warn_once("grad", "gradients are required (grad mode is on and an input or a parameter "
                                    "requires grad): running the original module, exact but without fxstream's "
                                    "savings (its sliced ops have no backward); call it under torch.no_grad() or "
                                    "torch.inference_mode() for inference")
            with self._fx_lock:
                self._fx_check_guard()  # graphs of weights that changed are dropped even when not run
            return self._run_original(args, kwargs)
        # model CPU offload moves the component in before its forward: the guard sees it where it computes
        args, kwargs = hooks.before_call(self.original, args, kwargs)
        flat, extra = normalize_inputs(self.original, args, kwargs)
        flat, as_tuple = self._canonical(flat)
        key = signature_of(flat) + signature_of(tuple(extra.items()))
        with self._fx_lock:
            entry = self._entry(key, flat, extra)
        if entry is None or entry.runs_original:
            return self._run_original(args, kwargs)
        if self._fx_rehash is None or entry.partial is None:
            out = entry.graph_module(*flat, **extra)
        else:
            timestep = flat[self._fx_timestep_index] if self._fx_timestep_index is not None else None
            full = self._fx_rehash.next_call(timestep, key)
            graph_module = entry.graph_module if full else entry.partial.graph_module
            out = graph_module(*flat, **extra)
        out = hooks.after_call(self.original, out)
        if not as_tuple:
            return out
        if hasattr(out, "to_tuple"):
            return out.to_tuple()
        self._fx_tuple_outputs = False  # not a diffusers output: return_dict=False gets a graph of its own
        return self.forward(*args, **kwargs)

    def _entry(self, key: tuple, flat: tuple, extra: dict) -> CompiledEntry | None:
        """The compiled entry for ``key`` (compiling it if need be), after the guard; None: run the original."""
        self._fx_check_guard()
        if len(self._fx_recompiles) > MAX_RECOMPILES:
            self._warn_once("recompiles", f"{type(self.original).__name__} changed {len(self._fx_recompiles)} "
                            f"times since it was compiled (last: {self._fx_recompiles[-1]}): running the "
                            "original module from now on; compile it again once it stops changing")
            return None
        if self._fx_uncapturable is not None:
            if guards.changed(self.original, self._fx_uncapturable) is None:
                return None
            self._fx_uncapturable = None  # it changed again: try once more
        entry = self._fx_cache.get(key)
        if entry is not None:
            self._fx_cache.move_to_end(key)
        else:
            # compiling is not part of the call: a dispatch mode watching the call (fxstream.measure) must not
            # see the tracer's tensors
            rehash = self._fx_rehash
            try:
                with _disable_current_modes():
                    entry = build_plan(
                        self.original, flat, budget_bytes=self._fx_budget_bytes, chunks=self._fx_chunks,
                        target=self._fx_target, kwargs=extra,
                        rehash=rehash.config if rehash is not None else None,
                        cache=rehash.cache if rehash is not None else None, replay=self._fx_replay,
                        hint=self._fx_previous.pop(key, None),
                    )
            except CaptureError as e:
                if not self._fx_recompiles:
                    raise  # the module as given cannot be captured: the user's to know, now
                # it could, before it changed (an offload hook, say): the original runs until it changes again
                self._fx_uncapturable = guards.fingerprint(self.original)
                self._warn_once(f"capture {len(self._fx_recompiles)}",
                                f"after it changed ({self._fx_recompiles[-1]}) it cannot be captured ({e}); "
                                "running the original module until it changes again")
                return None
            if self._fx_backend == "inductor" and not entry.runs_original:
                from fxstream.runtime.inductor import compile_bodies

                compile_bodies(entry.graph_module)
                if entry.partial is not None:
                    compile_bodies(entry.partial.graph_module)
            self._fx_cache[key] = entry
            while len(self._fx_cache) > MAX_SIGNATURES:
                self._fx_cache.popitem(last=False)
            if self._fx_guard is None:
                self._fx_guard = guards.fingerprint(self.original)
        self._fx_last = entry
        return entry

    def _fx_check_guard(self) -> None:
        if self._fx_guard is not None:
            what = guards.changed(self.original, self._fx_guard)
            if what is not None:
                self._fx_drop(what)

    def _fx_drop(self, what: str) -> None:
        """The module changed (``what``): forget every graph and the tensors they hold."""
        self._fx_recompiles.append(what)
        # a LoRA scale or a dtype change leaves the graph's structure as it was: its plan replays, unsearched
        self._fx_previous = {key: entry.plan for key, entry in self._fx_cache.items()}
        self._fx_cache.clear()
        self._fx_last = None
        self._fx_guard = None
        if self._fx_rehash is not None:
            self._fx_rehash.reset()

    def _canonical(self, flat: tuple) -> tuple[tuple, bool]:
        """The call a graph is compiled for, and whether its output is turned into a tuple afterwards:
        ``return_dict=False`` runs the ``return_dict=True`` graph (a diffusers output's ``to_tuple()`` is what
        the model returns), and a timestep a diffusers UNet only broadcasts and embeds becomes one float."""
        if not _is_diffusers(self.original):
            return flat, False
        flat, as_tuple = list(flat), False
        i = self._fx_return_dict
        if i is not None and i < len(flat) and flat[i] is False and self._fx_tuple_outputs:
            flat[i], as_tuple = True, True
        i = self._fx_timestep_index
        if i is not None and i < len(flat) and _broadcasts_timestep(self.original):
            flat[i] = _canonical_timestep(flat[i])
        return tuple(flat), as_tuple

    def _run_original(self, args: tuple, kwargs: dict) -> Any:
        # _call_impl, not __call__: when fxstream.optimize installed this module in the original's place,
        # calling the original would come back here
        return self.original._call_impl(*args, **kwargs)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._fx_warned:
            self._fx_warned.add(key)
            warnings.warn(f"fxstream: {type(self.original).__name__}: {message}", EagerFallbackWarning,
                          stacklevel=4)

    # -- identity: pickling, copying ---------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        for name in ("_fx_cache", "_fx_last", "_fx_guard", "_fx_recompiles", "_fx_lock", "_fx_warned",
                     "_fx_tuple_outputs", "_fx_previous", "_fx_uncapturable"):
            state.pop(name, None)
        if self._fx_rehash is not None:  # a generation in flight does not travel
            state["_fx_rehash"] = RehashController(self._fx_rehash.config)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._fx_init_state()

    # -- Step Rehash -------------------------------------------------------------------------------------------
    @property
    def rehash(self) -> RehashController | None:
        """The Step Rehash controller (None when rehash is off): ``reset()``, ``set_step(i)``, ``history``."""
        return self._fx_rehash

    # -- what was decided --------------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        """The Plan of the most recent call's input signature (None before the first call)."""
        return self._fx_last.plan if self._fx_last else None

    @property
    def compiled(self) -> CompiledEntry | None:
        return self._fx_last

    def report(self) -> str:
        """Baseline (eager) vs planned memory, per block, for the most recent input signature, as text
        (``print(unet.report())``; as :meth:`fxstream.pipelines.PipelineOptimization.report`)."""
        from fxstream.report import plan_report

        if self._fx_last is None:
            return "not compiled yet: call the module once"
        return plan_report(self._fx_last)

    # -- drop-in attributes ------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self._modules.get("original")
            if original is None:
                raise
            return getattr(original, name)

    def extra_repr(self) -> str:
        budget = "minimum" if self._fx_budget_bytes is None else format_bytes(self._fx_budget_bytes)
        text = f"budget={budget}, compiled_signatures={len(self._fx_cache)}"
        if self._fx_backend is not None:
            text += f", backend={self._fx_backend}"
        if self._fx_recompiles:
            text += f", recompiled {len(self._fx_recompiles)}x (last: {self._fx_recompiles[-1]})"
        if self._fx_replay is not None:
            text += f", replaying a plan for ({self._fx_replay.signature})"
        if self._fx_rehash is not None:
            text += f", rehash={self._fx_rehash.config.cache_point}: {self._fx_rehash.config.schedule.describe()}"
        return text
