"""``fxstream.calibrate``: choose where to cache and which steps to run in full from the error of the model's
OUTPUT, for a wanted speedup.

    def generate(unet):                       # one whole generation that calls ``unet`` once per step
        pipe.unet = unet
        return pipe(image, num_inference_steps=25, generator=torch.Generator().manual_seed(0),
                    output_type="latent").frames

    cal = fxstream.calibrate(pipe.unet, generate, speedup=1.8)
    print(cal.table())                        # every cut: its best schedule, predicted and measured error
    cal.config.save("rehash.json")            # cache point + schedule
    pipe.unet = fxstream.compile(pipe.unet, budget_gb=8, rehash=cal.config)

Why the output: a feature that stays similar to itself from step to step is no sign that reusing it is good.
After the deepest cut (the last temporal layer, followed only by ``norm_out`` / ``conv_out``) nothing of the
current input reaches the output, so a rehash step there just returns the previous step's output, however
self-similar the feature. What matters is how far the output of a rehash step is from the full output, and
how much of that reaches the final sample.

What it runs (all on the module's captured graph, on the device the generation runs on):

1. The calibration generations, in full. At every step i, for every candidate cut c (every layer of the last
   two up blocks and the DeepCache-style cut, :func:`passes.rehash.layer_candidates`) and every earlier
   anchor step j within the cut's window, the partial graph runs from c's value at step j on step i's inputs:
   ``output_error[c][i, j]`` is the relative L2 distance of its output from the full output (the guidance
   batch together). ``reuse_error[i, j]`` is the same for returning step j's output itself: a cut scored no
   better than that is just reuse.
2. Sensitivity: how much an output error at step i moves the final sample. The first generation runs again
   with step i's output replaced by step i-1's (the earlier steps are replayed from the record, not
   recomputed); ``sensitivity[i]`` is the final sample's change over the output's change.
3. For the target (``speedup``: UNet FLOPs of a full generation over those with rehash; or ``full_steps``),
   every cut's most full steps that still meet it, and four schedules: the least predicted error (a dynamic
   program over the error map, exact for the model below), Algorithm 1 on the output-error map, Algorithm 1
   on the feature's self-similarity (the paper's), and evenly spaced steps. The predicted error of the final
   sample is ``sum over rehash steps i of sensitivity[i] * output_error[c][i, anchor] * |output_i| / |final|``.
4. Validation: ``validate`` options run as real rehash generations of every calibration generation (steps
   before the first rehash step replayed), and the least measured error of the final sample (the geometric
   mean over generations, as a mean PSNR averages) wins. The order (:func:`validation_order`): the paper's
   option, the choice to beat, then the best-predicted of each method and of each cut, then the rest. The
   final error depends on the seed (on the svd reference model one schedule's PSNR ranges over 15 dB between
   seeds): calibrate on several generations.

``generate`` must make the same generation each time it is called (fixed seeds): steps are replayed from the
record where their inputs are equal, which is checked. With ``generations=N`` it is called as
``generate(unet, index)`` for index 0..N-1 (vary the seed by index); the error maps are averaged over them.
Its return value is the final sample (a tensor, or an output with ``frames``/``images``/``sample`` as a tensor
or array); anything else: the last UNet call's output stands in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxstream.runtime.rehash import FeatureCache, RehashConfig, Schedule, schedule_for
from passes.rehash import CachePoint

# Schedules tried for every cut (RehashOption.method).
LEAST_ERROR = "least predicted error"
ALGORITHM1_OUTPUT = "Algorithm 1, output error"
ALGORITHM1_FEATURE = "Algorithm 1, feature similarity"
UNIFORM = "evenly spaced"
REFINED = "refined by validation"  # a validated option's full steps moved by one step while measured better
METHODS = (LEAST_ERROR, ALGORITHM1_OUTPUT, ALGORITHM1_FEATURE, UNIFORM, REFINED)
# A refinement move is kept only if it lowers the measured error by this fraction (below: noise of the choice).
REFINE_GAIN = 0.02

# A cut's window (how many earlier anchors each step is measured from) grows as its partial graph gets cheaper:
# WINDOW_COST / (1 - skipped fraction) anchors, so that every cut costs about WINDOW_COST full calls per step;
# at least MIN_WINDOW (a 2x speedup at a cut that skips 70% needs gaps of about 3 steps).
WINDOW_COST = 2.5
MIN_WINDOW = 3
# Sensitivity is measured at about this many steps and interpolated between them: each measurement is a
# partial generation (about half a generation on average).
SENSITIVITY_POINTS = 12
DEFAULT_VALIDATE = 8


@dataclass(frozen=True)
class RehashOption:
    """One (cut, schedule) pair for a target, with its predicted and (when validated) measured error."""

    cut: CachePoint
    schedule: Schedule
    method: str  # one of METHODS
    flops_ratio: float  # UNet FLOPs of a full generation over this option's
    predicted_error: float  # predicted relative L2 error of the final sample
    measured_error: float | None = None  # measured on the first calibration generation, when validated

    @property
    def error(self) -> float:
        """The measured error where there is one, else the predicted."""
        return self.measured_error if self.measured_error is not None else self.predicted_error


@dataclass(frozen=True)
class Target:
    """What a choice must meet: a FLOPs speedup, or a number of full steps."""

    speedup: float | None = None
    full_steps: int | None = None

    def describe(self) -> str:
        return f"{self.speedup:.2f}x fewer UNet FLOPs" if self.speedup is not None else \
            f"{self.full_steps} full steps"


@dataclass(frozen=True)
class Measurements:
    """What the calibration generations measured (averaged over generations; sensitivity from the first)."""

    candidates: list[CachePoint]
    num_steps: int
    output_error: dict[str, torch.Tensor]  # path -> (N, N) relative L2 error at step i from anchor j; nan: not run
    output_cosine: dict[str, torch.Tensor]  # path -> (N, N) cosine similarity of those outputs with the full one
    reuse_error: torch.Tensor  # (N, N) relative L2 distance of step j's output from step i's
    similarity: dict[str, torch.Tensor]  # path -> (N, N) cosine similarity of the feature between steps
    sensitivity: torch.Tensor  # (N,) change of the final sample per unit change of step i's output
    output_norm: torch.Tensor  # (N,) L2 norm of each step's output
    final_norm: float  # L2 norm of the final sample
    reference: str | None = None  # the paper's cut (what rehash="auto" caches), when among the candidates

    def error_over_reuse(self, path: str) -> float:
        """Mean over measured (i, j) of the cut's output error over that of reusing step j's output: about 1
        means the cut is no better than reusing the previous output (nothing of the current input gets through)."""
        err = self.output_error[path]
        mask = ~torch.isnan(err) & (self.reuse_error > 0)
        if not mask.any():
            return float("nan")
        return float((err[mask] / self.reuse_error[mask]).mean())


@dataclass
class Calibration:
    """What :func:`calibrate` measured (``measured``, also read through the properties below), and the (cut,
    schedule) it chose for the target."""

    measured: Measurements
    target: Target
    options: list[RehashOption]  # every option for the target, least predicted error first (a refined one last)
    chosen: RehashOption
    unreachable: dict[str, float]  # path -> the most FLOPs speedup that cut can reach, for cuts that miss it
    seconds: float  # wall-clock time of the calibration (generations, sensitivity, validations)
    unet_calls: dict[str, int]  # "full", "partial", "replayed": calls made while calibrating
    _validator: Callable[[CachePoint, Schedule], float] | None = field(default=None, repr=False, compare=False)

    # -- what was measured ----------------------------------------------------------------------------------------
    @property
    def candidates(self) -> list[CachePoint]:
        return self.measured.candidates

    @property
    def num_steps(self) -> int:
        return self.measured.num_steps

    @property
    def output_error(self) -> dict[str, torch.Tensor]:
        return self.measured.output_error

    @property
    def reuse_error(self) -> torch.Tensor:
        return self.measured.reuse_error

    @property
    def similarity(self) -> dict[str, torch.Tensor]:
        return self.measured.similarity

    @property
    def sensitivity(self) -> torch.Tensor:
        return self.measured.sensitivity

    @property
    def final_norm(self) -> float:
        return self.measured.final_norm

    def error_over_reuse(self, path: str) -> float:
        return self.measured.error_over_reuse(path)

    # -- the choice ----------------------------------------------------------------------------------------------
    @property
    def recommended(self) -> CachePoint:
        return self.chosen.cut

    @property
    def schedule(self) -> Schedule:
        return self.chosen.schedule

    @property
    def config(self) -> RehashConfig:
        """The chosen cache point and schedule, ready for ``fxstream.compile(..., rehash=...)``; its
        ``similarity`` is the output-based map at the cut (1 - output error; -1 where not measured)."""
        sim = output_similarity(self.output_error[self.chosen.cut.path])
        return RehashConfig(cache_point=self.chosen.cut.path, schedule=self.chosen.schedule,
                            similarity=tuple(tuple(round(float(v), 6) for v in row) for row in sim))

    def choose(self, *, speedup: float | None = None, full_steps: int | None = None,
               validate: int = DEFAULT_VALIDATE, refine_runs: int = 0) -> Calibration:
        """The same measurements, chosen for another target (validation runs more generations)."""
        target = _target(speedup, full_steps, self.num_steps)
        start = time.perf_counter()
        options, unreachable = rank_options(self.measured, target)
        chosen, options = _chosen(self.measured, options, validate, refine_runs, self._validator)
        return dataclasses.replace(self, target=target, options=options, chosen=chosen, unreachable=unreachable,
                                   seconds=self.seconds + time.perf_counter() - start)

    def option(self, path: str, method: str) -> RehashOption:
        """The option of cut ``path`` with schedule ``method`` for this target (KeyError: the cut misses it)."""
        for o in self.options:
            if o.cut.path == path and o.method == method:
                return o
        raise KeyError(f"no option {method!r} at {path!r} for {self.target.describe()}")

    # -- reports ----------------------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One row per cut: its best option for the target, and why it was not chosen."""
        best: dict[str, RehashOption] = {}
        for o in self.options:  # validated options first where they exist, then the least predicted error
            cur = best.get(o.cut.path)
            if cur is None or (o.measured_error is not None, -o.error) > (cur.measured_error is not None, -cur.error):
                best[o.cut.path] = o
        out = []
        for c in self.candidates:
            o = best.get(c.path)
            row: dict[str, Any] = dict(cache_point=c.path, module=c.module_class,
                                       skipped_flops=round(c.skipped_fraction, 4),
                                       error_vs_reuse=round(self.error_over_reuse(c.path), 3))
            if o is None:
                row.update(schedule="-", flops_ratio=None, predicted_error=None, measured_error=None,
                           chosen=f"no: reaches at most {self.unreachable.get(c.path, 1.0):.2f}x")
            else:
                row.update(schedule=f"{o.method}: {o.schedule.describe(self.num_steps)}",
                           flops_ratio=round(o.flops_ratio, 3), predicted_error=_round(o.predicted_error),
                           measured_error=_round(o.measured_error), chosen=self._why(o))
            out.append(row)
        return out

    def _why(self, o: RehashOption) -> str:
        c = self.chosen
        if o == c:
            return "yes"
        if o.measured_error is not None and c.measured_error is not None:
            return f"no: measured error {o.measured_error:.3g} > {c.measured_error:.3g}"
        return f"no: predicted error {o.predicted_error:.3g} > {c.predicted_error:.3g}"

    def table(self) -> str:
        from tabulate import tabulate

        head = (f"target: {self.target.describe()} over {self.num_steps} steps; chosen: {self.chosen.cut.path}, "
                f"{self.chosen.method}, {self.chosen.schedule.describe(self.num_steps)} "
                f"({self.chosen.flops_ratio:.2f}x FLOPs); calibration {self.seconds:.0f} s, UNet calls "
                + ", ".join(f"{v} {k}" for k, v in self.unet_calls.items()))
        return head + "\n" + tabulate(self.rows(), headers="keys", tablefmt="github")


def _round(v: float | None) -> float | None:
    return None if v is None else float(f"{v:.4g}")


# ------------------------------------------------------------------------------------------------ the maths


def output_similarity(error: torch.Tensor) -> torch.Tensor:
    """The map Algorithm 1 reads, from an output-error map: 1 - error, and -1 where no error was measured (a
    gap beyond the window must be a key step)."""
    return torch.where(torch.isnan(error), torch.full_like(error, -1.0), 1.0 - error)


def cosine_map(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, N) cosine similarities between flattened features."""
    flat = torch.stack([f.reshape(-1).double() for f in features])
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (flat @ flat.T).float()


def flops_ratio(cut: CachePoint, num_steps: int, full_steps: int) -> float:
    """UNet FLOPs of ``num_steps`` full calls over those of ``full_steps`` full calls and rehash steps."""
    return cut.flops_saved(num_steps, full_steps)


def most_full_steps(cut: CachePoint, num_steps: int, speedup: float) -> int | None:
    """The most full steps whose FLOPs ratio at ``cut`` still reaches ``speedup`` (more full steps, less
    error); None when even the fewest (step 0 and the last) do not."""
    least = min(2, num_steps)
    for k in range(num_steps, least - 1, -1):
        if flops_ratio(cut, num_steps, k) >= speedup * (1 - 1e-9):
            return k
    return None


def predicted_error(cost: torch.Tensor, schedule: Schedule) -> float:
    """Sum over the rehash steps i of ``cost[i, anchor]`` (anchor: the latest full step before i)."""
    n = cost.shape[0]
    total, anchor = 0.0, 0
    for i in range(n):
        if schedule.is_full(i):
            anchor = i
        else:
            total += float(cost[i, anchor])
    return total


def least_cost_schedule(cost: torch.Tensor, full_steps: int) -> Schedule | None:
    """The schedule with ``full_steps`` full steps (0 and N-1 among them) whose :func:`predicted_error` is
    least: dynamic programming over (number of full steps so far, the latest one). None: no schedule with a
    finite cost (the window is too short for so few full steps)."""
    n = cost.shape[0]
    c = cost.double().tolist()
    if full_steps >= n:
        return Schedule.steps(range(n), num_steps=n)
    inf = math.inf
    # seg[j][i]: the cost of the rehash steps between full steps j and i
    seg = [[inf] * n for _ in range(n)]
    for j in range(n):
        total = 0.0
        if j + 1 < n:
            seg[j][j + 1] = 0.0  # adjacent full steps: no rehash step between them
        for i in range(j + 2, n):
            total += c[i - 1][j]
            seg[j][i] = total if not math.isnan(total) else inf
    best = [[inf] * n for _ in range(full_steps + 1)]
    back = [[-1] * n for _ in range(full_steps + 1)]
    best[1][0] = 0.0
    for m in range(2, full_steps + 1):
        for i in range(1, n):
            for j in range(i):
                v = best[m - 1][j] + seg[j][i]
                if v < best[m][i]:
                    best[m][i], back[m][i] = v, j
    if best[full_steps][n - 1] == inf:
        return None
    keys, i = [], n - 1
    for m in range(full_steps, 0, -1):
        keys.append(i)
        i = back[m][i]
    return Schedule.steps(keys, num_steps=n)


def evenly_spaced(num_steps: int, full_steps: int) -> Schedule:
    idx = torch.linspace(0, num_steps - 1, full_steps).round().long().unique().tolist()
    return Schedule.steps(idx, num_steps=num_steps)


def rank_options(cal: Measurements, target: Target) -> tuple[list[RehashOption], dict[str, float]]:
    """Every cut's options for ``target``, least predicted error first; and the cuts that cannot reach it."""
    n = cal.num_steps
    options, unreachable = [], {}
    for cut in cal.candidates:
        if target.speedup is not None:
            k = most_full_steps(cut, n, target.speedup)
            if k is None:
                unreachable[cut.path] = flops_ratio(cut, n, min(2, n))
                continue
        else:
            k = target.full_steps
        cost = prediction_costs(cal, cut.path)
        schedules = {
            LEAST_ERROR: least_cost_schedule(cost, k),
            ALGORITHM1_OUTPUT: schedule_for(output_similarity(cal.output_error[cut.path]), k),
            ALGORITHM1_FEATURE: schedule_for(cal.similarity[cut.path], k),
            UNIFORM: evenly_spaced(n, k),
        }
        for method, schedule in schedules.items():
            if schedule is None:
                continue
            options.append(RehashOption(cut, schedule, method, flops_ratio(cut, n, schedule.full_count(n)),
                                        predicted_error(cost, schedule)))
    options.sort(key=lambda o: (o.predicted_error, -o.flops_ratio))
    if not options:
        raise ValueError(f"calibrate: no cut reaches {target.describe()} (at most "
                         f"{max(unreachable.values()):.2f}x); ask for less")
    return options, unreachable


def prediction_costs(cal: Measurements, path: str) -> torch.Tensor:
    """(N, N): the predicted contribution of a rehash step i from anchor j to the final sample's relative error
    (inf where not measured)."""
    err = cal.output_error[path].double()
    cost = cal.sensitivity.double()[:, None] * err * cal.output_norm.double()[:, None] / max(cal.final_norm, 1e-30)
    return torch.where(torch.isnan(cost), torch.full_like(cost, math.inf), cost)


def validation_order(options: list[RehashOption], reference: str | None) -> list[RehashOption]:
    """The order options are validated in: the paper's option first (Algorithm 1 on the feature similarity at
    ``reference``, the cut ``rehash="auto"`` takes uncalibrated: the choice to beat), then the best-predicted
    option of each method, then of each cut, then the rest by predicted error. The prediction ranks options
    well within a method but less well across methods (it sums per-step errors, which the sampler partly
    corrects), so every method and cut gets a real run before a second option of any one."""
    ordered: list[RehashOption] = []
    firsts = [o for o in options if o.cut.path == reference and o.method == ALGORITHM1_FEATURE]
    for group in (lambda o: o.method, lambda o: o.cut.path):
        seen = set()
        for o in options:
            if group(o) not in seen:
                seen.add(group(o))
                firsts.append(o)
    for o in firsts + options:
        if o not in ordered:
            ordered.append(o)
    return ordered


def _validated(options: list[RehashOption], validate: int,
               validator: Callable[[CachePoint, Schedule], float] | None, reference: str | None = None
               ) -> tuple[RehashOption, list[RehashOption]]:
    """Run ``validate`` distinct options for real (:func:`validation_order`); the chosen one: the least
    measured error."""
    if validate <= 0 or validator is None:
        return options[0], options
    measured: dict[tuple[str, Schedule], float] = {}
    for o in validation_order(options, reference):
        key = (o.cut.path, o.schedule)
        if key in measured:
            continue
        if len(measured) >= validate:
            break
        measured[key] = validator(o.cut, o.schedule)
    options = [dataclasses.replace(o, measured_error=measured.get((o.cut.path, o.schedule))) for o in options]
    chosen = min((o for o in options if o.measured_error is not None),
                 key=lambda o: (o.measured_error, o.predicted_error, -o.flops_ratio))
    return chosen, options


def _chosen(cal: Measurements, options: list[RehashOption], validate: int, refine_runs: int,
            validator: Callable[[CachePoint, Schedule], float] | None) -> tuple[RehashOption, list[RehashOption]]:
    """Validation, then refinement of the best validated option; the options with the refined one added."""
    chosen, options = _validated(options, validate, validator, cal.reference)
    if refine_runs > 0 and validator is not None and chosen.measured_error is not None:
        refined = refine(cal, chosen, refine_runs, validator)
        if refined is not chosen:
            chosen = refined
            options = [*options, refined]
    return chosen, options


def refine(cal: Measurements, start: RehashOption, budget: int,
           validator: Callable[[CachePoint, Schedule], float]) -> RehashOption:
    """Local search from a validated option: move one of its full steps (not the first or the last) to a
    neighbouring rehash step, which keeps the count and so the FLOPs; try the moves in order of predicted
    error, keep the first that lowers the measured error by REFINE_GAIN, and go on from there, for at most
    ``budget`` validation runs. The prediction misses what the sampler does with an error (a rehash step at
    the few steps the final sample is most sensitive to can cost 15 dB on one seed and nothing on another);
    measured moves see it."""
    n = cal.num_steps
    cost = prediction_costs(cal, start.cut.path)
    best, spent, tried = start, 0, {start.schedule}
    improved = True
    while improved and spent < budget:
        improved = False
        full = [i for i in range(n) if best.schedule.is_full(i)]
        moves = []
        for f in full[1:-1]:
            for g in (f - 1, f + 1):
                if 0 < g < n - 1 and g not in full:
                    schedule = Schedule.steps([g if i == f else i for i in full], num_steps=n)
                    if schedule not in tried:
                        moves.append((predicted_error(cost, schedule), schedule))
        for predicted, schedule in sorted(moves, key=lambda m: m[0]):
            if spent >= budget:
                break
            tried.add(schedule)
            spent += 1
            error = validator(best.cut, schedule)
            if error < best.measured_error * (1 - REFINE_GAIN):
                best = RehashOption(best.cut, schedule, REFINED, best.flops_ratio, predicted, error)
                improved = True
                break
    return best


def _target(speedup: float | None, full_steps: int | None, num_steps: int) -> Target:
    if speedup is not None and full_steps is not None:
        raise ValueError("calibrate: give speedup or full_steps, not both")
    if speedup is not None:
        if not isinstance(speedup, (int, float)) or not speedup >= 1.0:
            raise ValueError(f"speedup must be a number >= 1, got {speedup!r}")
        return Target(speedup=float(speedup))
    if full_steps is None:
        full_steps = math.ceil(num_steps / 2)
    if not isinstance(full_steps, int) or not 1 <= full_steps <= num_steps:
        raise ValueError(f"full_steps must be an integer from 1 to {num_steps}, got {full_steps!r}")
    return Target(full_steps=full_steps)


# ------------------------------------------------------------------------------------------------ running


def _first_tensor(value: Any) -> torch.Tensor | None:
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def _with_first_tensor(value: Any, tensor: torch.Tensor) -> Any:
    leaves, spec = pytree.tree_flatten(value)
    i = next(k for k, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    leaves = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    leaves[i] = tensor
    return pytree.tree_unflatten(leaves, spec)


def _final_tensor(result: Any) -> torch.Tensor | None:
    """The final sample in what ``generate`` returned, if it holds one as a tensor or array."""
    for value in (result, *(getattr(result, name, None) for name in ("frames", "images", "sample"))):
        if isinstance(value, torch.Tensor):
            return value.detach()
        if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
            return torch.as_tensor(value)
    return None


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def _same_inputs(flat: tuple, recorded: tuple) -> bool:
    if len(flat) != len(recorded):
        return False
    for a, b in zip(flat, recorded):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                    and a.dtype == b.dtype and torch.equal(a, b.to(a.device))):
                return False
        elif a != b:
            return False
    return True


def _snapshot(value: Any) -> Any:
    return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


class _Runner:
    """The module's call while calibrating (installed where ``fxstream.optimize`` installs its call): one
    generation at a time, recording, or replaying the record up to a step and then running ``override``."""

    def __init__(self, module: nn.Module, cache_points: Sequence[str] | None, max_gap: int | None) -> None:
        self.module = module
        self.cache_points = cache_points
        self.max_gap = max_gap
        self.candidates: list[CachePoint] | None = None
        self.reference: str | None = None
        self.calls = {"full": 0, "partial": 0, "replayed": 0}
        self.reset(record=True)

    # -- set up on the first call ------------------------------------------------------------------------------
    def _build(self, args: tuple, kwargs: dict) -> None:
        from fxstream.capture import capture
        from passes import rehash as rehash_pass

        gm = capture(self.module, *args, **kwargs)
        if self.cache_points is not None:
            order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
            named = {c.node: c for c in (rehash_pass.resolve(gm, p) for p in self.cache_points)}
            found = sorted(named.values(), key=lambda c: order[c.node])  # graph order, each node once
        else:
            found = rehash_pass.layer_candidates(gm)
        if not found:
            raise ValueError("calibrate: the model has no candidate cache point (no up blocks)")
        self.candidates = found
        try:
            paper = rehash_pass.resolve(gm, "auto").path
        except ValueError:  # no temporal layer in the decoder
            paper = None
        self.reference = paper if any(c.path == paper for c in found) else None
        self.full_caches = {c.path: FeatureCache() for c in found}
        self.partial_caches = {c.path: FeatureCache() for c in found}
        self.full = rehash_pass.storing_graph(gm, {c.node: self.full_caches[c.path] for c in found})
        self.partial = {c.path: rehash_pass.partial_graph(gm, c.node, self.partial_caches[c.path]) for c in found}

    def window(self, cut: CachePoint) -> int:
        """How many earlier anchors each step is measured from at ``cut``."""
        if self.max_gap is not None:
            return self.max_gap
        remaining = max(1.0 - cut.skipped_fraction, 1e-6)
        return max(MIN_WINDOW, math.ceil(WINDOW_COST / remaining))

    # -- modes ---------------------------------------------------------------------------------------------------
    def reset(self, record: bool, override: Callable | None = None, start: int = 0) -> None:
        self.step = 0
        self.recording = record
        self.override = override
        self.start = start
        self.last_output: torch.Tensor | None = None
        if record:
            self.inputs: list[tuple] = []
            self.outputs: list[Any] = []
            self.features: dict[str, list[torch.Tensor]] = {}
            self.errors: dict[str, dict[tuple[int, int], tuple[float, float]]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from fxstream.capture import normalize_inputs

        if self.candidates is None:
            self._build(args, kwargs)
        flat, extra = normalize_inputs(self.module, args, kwargs)
        step, self.step = self.step, self.step + 1
        if self.recording:
            out = self._record(step, flat, extra)
        elif step < self.start:
            if step >= len(self.inputs) or not _same_inputs(flat, self.inputs[step]):
                raise ValueError(
                    f"calibrate: generate() is not deterministic: step {step}'s inputs differ from the first "
                    "run's; fix its seeds (with generations > 1, vary them by the index generate(unet, index))")
            self.calls["replayed"] += 1
            out = _snapshot(self.outputs[step])
        else:
            out = self.override(step, flat, extra)
        self.last_output = _first_tensor(out)
        return out

    def run_full(self, flat: tuple, extra: dict) -> Any:
        self.calls["full"] += 1
        return self.full(*flat, **extra)

    def run_partial(self, path: str, feature: torch.Tensor, flat: tuple, extra: dict) -> Any:
        self.calls["partial"] += 1
        self.partial_caches[path].value = feature
        try:
            return self.partial[path](*flat, **extra)
        finally:
            self.partial_caches[path].clear()

    def _record(self, step: int, flat: tuple, extra: dict) -> Any:
        out = self.run_full(flat, extra)
        o = _first_tensor(out)
        self.inputs.append(tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in flat))
        self.outputs.append(_snapshot(out))
        for c in self.candidates:
            value = self.full_caches[c.path].value
            self.full_caches[c.path].clear()
            feats = self.features.setdefault(c.path, [])
            feats.append(value.detach())
            errs = self.errors.setdefault(c.path, {})
            for j in range(max(0, step - self.window(c)), step):
                p = _first_tensor(self.run_partial(c.path, feats[j], flat, extra))
                errs[(step, j)] = (_relative(p, o), _cosine(p, o))
        return out


def _accepts_index(generate: Callable) -> bool:
    try:
        inspect.signature(generate).bind(None, 0)
        return True
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): assume the documented one-argument form
        return False


def calibrate(
    unet: nn.Module,
    generate: Callable[..., Any],
    *,
    speedup: float | None = None,
    full_steps: int | None = None,
    generations: int = 1,
    cache_points: Sequence[str] | None = None,
    max_gap: int | None = None,
    validate: int = DEFAULT_VALIDATE,
    sensitivity_points: int = SENSITIVITY_POINTS,
    refine_runs: int = 0,
    progress: bool | None = None,
) -> Calibration:
    """Measure the output error of every candidate cut and choose a (cut, schedule) for the target.

    Args:
        unet: the UNet (or an fxstream-compiled one: its original module is used).
        generate: runs one whole generation with the module it is given (one call per denoising step), the same
            generation each time (fixed seeds), and returns the final sample (see the module docstring).
        speedup: the target, as UNet FLOPs of a full generation over those with rehash (e.g. 1.8): every cut
            gets the most full steps that still reach it; cuts that cannot are left out.
        full_steps: the target as a number of full steps instead (default, without ``speedup``: half of the
            steps, rounded up).
        generations: calibration generations to average the error maps over; with more than one, ``generate``
            is called as ``generate(unet, index)``.
        cache_points: restrict the candidates to these module paths (or ``"deepcache"``).
        max_gap: how many earlier anchors each step is measured from, for every cut (default: more for cuts
            whose partial graph is cheaper; see WINDOW_COST).
        validate: how many options run as real rehash generations to choose from (:func:`validation_order`;
            0: choose by the prediction alone). Each runs once per calibration generation.
        refine_runs: after validation, at most this many more validation runs of a local search from the best
            option (:func:`refine`; 0: none).
        sensitivity_points: at how many steps the sensitivity is measured (each a partial generation); 0: not
            measured, every step's output error weighs the same.
        progress: a progress bar on stderr (default: when stderr is a terminal).

    Raises:
        ValueError: for bad arguments, a ``generate`` that never calls the module or is not deterministic, or a
            target no cut reaches.
    """
    from tqdm.auto import tqdm

    if not isinstance(generations, int) or generations < 1:
        raise ValueError(f"generations must be a positive integer, got {generations!r}")
    if max_gap is not None and (not isinstance(max_gap, int) or max_gap < 1):
        raise ValueError(f"max_gap must be a positive integer, got {max_gap!r}")
    for name, value in (("validate", validate), ("sensitivity_points", sensitivity_points),
                        ("refine_runs", refine_runs)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    _target(speedup, full_steps, max(full_steps or 1, 1))  # argument checks before any work
    indexed = _accepts_index(generate)
    if generations > 1 and not indexed:
        raise ValueError("calibrate: generations > 1 needs generate(unet, index), which varies the seed by index")

    start = time.perf_counter()
    module = getattr(unet, "original", unet)
    runner = _Runner(module, cache_points, max_gap)
    bar = tqdm(desc="calibrating Step Rehash", unit="step", disable=not progress if progress is not None else None,
               leave=False)

    def run(index: int) -> torch.Tensor:
        result = generate(module, index) if indexed else generate(module)
        if runner.step == 0:
            raise ValueError("calibrate: generate() never called the module it was given")
        bar.update(runner.step)
        final = _final_tensor(result)
        return final if final is not None else runner.last_output

    try:
        with _installed(module, runner), torch.no_grad():
            records = []
            for g in range(generations):
                runner.reset(record=True)
                final = run(g)
                records.append(dict(final=final, inputs=runner.inputs, outputs=runner.outputs,
                                    features=runner.features, errors=runner.errors))
            n = len(records[0]["outputs"])
            if any(len(r["outputs"]) != n for r in records):
                raise ValueError(f"calibrate: generations had different step counts "
                                 f"{[len(r['outputs']) for r in records]}")
            if n < 2:
                raise ValueError("calibrate: a generation needs at least 2 steps")
            first = records[0]
            runner.inputs, runner.outputs = first["inputs"], first["outputs"]
            outputs = [_first_tensor(o) for o in first["outputs"]]
            sensitivity = _sensitivity(runner, run, outputs, first["final"], sensitivity_points)
            measured = _assemble(runner, records, sensitivity, n)
            validator = _make_validator(runner, run, records)
            target = _target(speedup, full_steps, n)
            options, unreachable = rank_options(measured, target)
            chosen, options = _chosen(measured, options, validate, refine_runs, validator)
    finally:
        bar.close()
    return Calibration(measured, target, options, chosen, unreachable, time.perf_counter() - start,
                       dict(runner.calls), _detached_validator(runner, validator, module))


def _sensitivity(runner: _Runner, run: Callable[[int], torch.Tensor], outputs: list[torch.Tensor],
                 final: torch.Tensor, points_wanted: int) -> torch.Tensor:
    """(N,): the final sample's change over the output's change when step i returns step i-1's output, measured
    at about ``points_wanted`` steps and interpolated linearly between them (all ones for 0)."""
    n = len(outputs)
    if points_wanted == 0:
        return torch.ones(n, dtype=torch.float64)
    inner = list(range(1, n - 1))
    stride = max(1, math.ceil(len(inner) / points_wanted))
    points = inner[::stride]
    if inner and points[-1] != inner[-1]:
        points.append(inner[-1])
    measured: dict[int, float] = {}
    for p in points:
        delta = (outputs[p - 1] - outputs[p]).double().norm().item()
        if delta == 0:
            measured[p] = 0.0
            continue

        def override(step: int, flat: tuple, extra: dict, p: int = p) -> Any:
            if step == p:
                return _with_first_tensor(runner.outputs[p], outputs[p - 1].clone())
            return runner.run_full(flat, extra)

        runner.reset(record=False, override=override, start=p)
        moved = run(0)
        measured[p] = (moved.double() - final.double()).norm().item() / delta
    out = torch.zeros(n, dtype=torch.float64)
    if not measured:
        return out
    xs = sorted(measured)
    for i in range(n):
        lo = max((x for x in xs if x <= i), default=xs[0])
        hi = min((x for x in xs if x >= i), default=xs[-1])
        out[i] = measured[lo] if hi == lo else measured[lo] + (measured[hi] - measured[lo]) * (i - lo) / (hi - lo)
    return out


def _assemble(runner: _Runner, records: list[dict], sensitivity: torch.Tensor, n: int) -> Measurements:
    """The maps, averaged over generations."""
    nan = float("nan")
    error, cosine, similarity = {}, {}, {}
    for c in runner.candidates:
        e = torch.full((n, n), nan, dtype=torch.float64)
        s = torch.full((n, n), nan, dtype=torch.float64)
        for (i, j) in records[0]["errors"][c.path]:
            e[i, j] = sum(r["errors"][c.path][(i, j)][0] for r in records) / len(records)
            s[i, j] = sum(r["errors"][c.path][(i, j)][1] for r in records) / len(records)
        error[c.path], cosine[c.path] = e, s
        similarity[c.path] = torch.stack([cosine_map(r["features"][c.path]) for r in records]).mean(0)
    reuse = torch.zeros(n, n, dtype=torch.float64)
    norms = torch.zeros(n, dtype=torch.float64)
    for r in records:
        outs = [_first_tensor(o) for o in r["outputs"]]
        for i in range(n):
            norms[i] += outs[i].double().norm().item() / len(records)
            for j in range(n):
                reuse[i, j] += _relative(outs[j], outs[i]) / len(records)
    final_norm = records[0]["final"].double().norm().item()
    return Measurements(runner.candidates, n, error, cosine, reuse, similarity, sensitivity, norms, final_norm,
                        runner.reference)


def _make_validator(runner: _Runner, run: Callable[[int], torch.Tensor], records: list[dict]
                    ) -> Callable[[CachePoint, Schedule], float]:
    """Runs a (cut, schedule) as a real rehash generation of every calibration generation (the steps before
    its first rehash step replayed); returns the geometric mean over them of the final sample's relative L2
    error against the full generation's: the mean of log errors, as a mean PSNR averages."""

    def one(record: dict, index: int, cut: CachePoint, schedule: Schedule) -> float:
        n = len(record["outputs"])
        rehash_steps = [i for i in range(n) if not schedule.is_full(i)]
        if not rehash_steps:
            return 0.0
        begin = rehash_steps[0]
        anchor = {"value": record["features"][cut.path][max(i for i in range(begin) if schedule.is_full(i))]}

        def override(step: int, flat: tuple, extra: dict) -> Any:
            if schedule.is_full(step):
                out = runner.run_full(flat, extra)
                anchor["value"] = runner.full_caches[cut.path].value
                for cache in runner.full_caches.values():
                    cache.clear()
                return out
            return runner.run_partial(cut.path, anchor["value"], flat, extra)

        runner.inputs, runner.outputs = record["inputs"], record["outputs"]
        runner.reset(record=False, override=override, start=begin)
        return _relative(run(index), record["final"])

    def validate(cut: CachePoint, schedule: Schedule) -> float:
        errors = [one(record, g, cut, schedule) for g, record in enumerate(records)]
        if min(errors) <= 0.0:
            return sum(errors) / len(errors)
        return math.exp(sum(math.log(e) for e in errors) / len(errors))

    return validate


def _detached_validator(runner: _Runner, validator: Callable[[CachePoint, Schedule], float], module: nn.Module
                        ) -> Callable[[CachePoint, Schedule], float]:
    """The validator for :meth:`Calibration.choose`: installs the runner around each validation run."""

    def validate(cut: CachePoint, schedule: Schedule) -> float:
        with _installed(module, runner), torch.no_grad():
            return validator(cut, schedule)

    return validate


@contextlib.contextmanager
def _installed(module: nn.Module, runner: _Runner) -> Iterator[None]:
    """``runner`` as the module's call (the slot ``fxstream.optimize`` installs its call in), then what was there."""
    before = module.__dict__.get("_compiled_call_impl")
    module.__dict__["_compiled_call_impl"] = runner
    try:
        yield
    finally:
        module.__dict__["_compiled_call_impl"] = before
