"""Step Rehash, run-time side: schedules, Algorithm 1 (key-step search), the config, the controller.

A *schedule* says which denoising steps are full steps (run the whole network, refresh the cached feature)
and which are rehash steps (start from the cached feature). Three kinds:

* ``Schedule.steps([0, 2, 5, ...])``: an explicit list of full steps (what :func:`key_steps` returns);
* ``Schedule.interval(k)``: every k-th step (0, k, 2k, ...) is full (DeepCache's uniform schedule);
* either of them with ``num_steps``: the last step (``num_steps - 1``) is full too.

Step 0 is always full (nothing is cached before it), and so is any step whose cached feature is missing.

The :class:`RehashController` belongs to a compiled module. It knows the step index: given explicitly
(:meth:`RehashController.set_step`, what ``fxstream.optimize`` does), or inferred from the timesteps when the
module is used bare: a timestep lower than the previous call's is the next step; any other (the first call, a
timestep that does not decrease) starts a new generation at step 0 and drops the cache. Every diffusers
scheduler's timesteps decrease within a generation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxstream.errors import InterleavedGenerationError


class FeatureCache:
    """The cached feature: one tensor (the guidance batch together), and the key of the graph that made it."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.key: Any = None

    def clear(self) -> None:
        self.value = None
        self.key = None

    @property
    def nbytes(self) -> int:
        return 0 if self.value is None else self.value.numel() * self.value.element_size()


class RehashStore(nn.Module):
    """``store(c)``: keeps ``c`` in the cache (a reference, no copy)."""

    def __init__(self, cache: FeatureCache) -> None:
        super().__init__()
        self.cache = cache

    def forward(self, x: torch.Tensor) -> None:
        self.cache.value = x


class RehashLoad(nn.Module):
    """``load()``: the cached feature. Fails loudly if there is none (a rehash step needs a full step first)."""

    def __init__(self, cache: FeatureCache) -> None:
        super().__init__()
        self.cache = cache

    def forward(self) -> torch.Tensor:
        if self.cache.value is None:
            raise RuntimeError("Step Rehash: no cached feature; the first step of a generation must be a full step")
        return self.cache.value


@dataclass(frozen=True)
class Schedule:
    """Which steps are full. See the module docstring."""

    full_steps: tuple[int, ...] = ()
    every: int | None = None
    num_steps: int | None = None
    gamma: float | None = None  # the similarity threshold that produced ``full_steps``, if any

    def __post_init__(self) -> None:
        if self.every is None and not self.full_steps:
            raise ValueError("a schedule needs full_steps or every")
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"every must be a positive integer, got {self.every!r}")
        if any((not isinstance(s, int)) or s < 0 for s in self.full_steps):
            raise ValueError(f"full_steps must be non-negative integers, got {self.full_steps!r}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be positive, got {self.num_steps!r}")

    @classmethod
    def steps(cls, full_steps: Sequence[int], num_steps: int | None = None, gamma: float | None = None) -> Schedule:
        return cls(full_steps=tuple(sorted({int(s) for s in full_steps})), num_steps=num_steps, gamma=gamma)

    @classmethod
    def interval(cls, every: int, num_steps: int | None = None) -> Schedule:
        return cls(every=every, num_steps=num_steps)

    def is_full(self, step: int) -> bool:
        if step == 0 or (self.num_steps is not None and step >= self.num_steps - 1):
            return True
        if self.every is not None:
            return step % self.every == 0
        return step in self.full_steps

    def full_count(self, num_steps: int) -> int:
        return sum(self.is_full(i) for i in range(num_steps))

    def describe(self, num_steps: int | None = None) -> str:
        n = num_steps or self.num_steps
        if self.every is not None:
            text = f"every {self.every} steps"
        else:
            text = "full steps " + ",".join(map(str, self.full_steps))
        if n:
            text += f" ({self.full_count(n)} of {n} full)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"full_steps": list(self.full_steps), "every": self.every, "num_steps": self.num_steps,
                "gamma": self.gamma}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        return cls(full_steps=tuple(data.get("full_steps") or ()), every=data.get("every"),
                   num_steps=data.get("num_steps"), gamma=data.get("gamma"))


# ------------------------------------------------------------------------------------------------ Algorithm 1


def key_steps(similarity: Any, gamma: float) -> list[int]:
    """Algorithm 1 (key-step search): the full steps for a similarity map and a threshold.

    ``similarity[i][j]`` is the similarity of the cached feature between steps i and j. The anchor starts at
    step 0 (a key step); walking forward, the first step whose similarity to the anchor falls below
    ``gamma`` becomes a key step and the new anchor. The last step is always a key step.
    """
    s = _as_matrix(similarity)
    n = s.shape[0]
    keys, anchor = [0], 0
    for i in range(1, n):
        if s[i, anchor] < gamma:
            keys.append(i)
            anchor = i
    if keys[-1] != n - 1:
        keys.append(n - 1)
    return keys


def schedule_for(similarity: Any, full_steps: int) -> Schedule:
    """The Algorithm 1 schedule with ``full_steps`` key steps (``num_steps`` = the map's size).

    It uses the largest threshold whose key steps are at most ``full_steps``; if no threshold gives exactly
    that many (the count can jump), the remaining key steps go to the rehash steps least similar to their
    anchor, so the count is exact.
    """
    s = _as_matrix(similarity)
    n = s.shape[0]
    if not 1 <= full_steps <= n:
        raise ValueError(f"full_steps must be between 1 and {n}, got {full_steps}")
    if full_steps >= n:
        return Schedule.steps(range(n), num_steps=n, gamma=math.inf)
    thresholds = sorted({float(v) for v in s.flatten().tolist()} | {-math.inf})
    best_gamma, best = -math.inf, key_steps(s, -math.inf)
    for g in thresholds:
        keys = key_steps(s, g)
        if len(keys) <= full_steps:
            best_gamma, best = g, keys
    keys = list(best)
    while len(keys) < full_steps:
        rest = [i for i in range(n) if i not in keys]
        anchor_sim = {i: float(s[i, max(k for k in keys if k < i)]) for i in rest}
        keys.append(min(rest, key=lambda i: (anchor_sim[i], i)))
        keys.sort()
    return Schedule.steps(keys, num_steps=n, gamma=best_gamma if best_gamma != -math.inf else None)


def _as_matrix(similarity: Any) -> torch.Tensor:
    s = torch.as_tensor(similarity, dtype=torch.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 1:
        raise ValueError(f"similarity must be a square N x N map, got shape {tuple(s.shape)}")
    return s


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class RehashConfig:
    """Where to cache and when to run full steps.

    Args:
        cache_point: the module whose output is cached, by path (``"up_blocks.3.attentions.2"``);
            ``"auto"``: the temporal layer of the decoder whose caching skips the most FLOPs;
            ``"deepcache"``: the input of the last up block (DeepCache-style, for comparisons).
        schedule: the full steps; default: every other step (13 of 25, as in the paper).
        similarity: the calibration's similarity map at the cache point, kept for reference and plots.
    """

    cache_point: str = "auto"
    schedule: Schedule = field(default_factory=lambda: Schedule.interval(2))
    similarity: tuple[tuple[float, ...], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"cache_point": self.cache_point, "schedule": self.schedule.to_dict(),
                "similarity": [list(r) for r in self.similarity] if self.similarity is not None else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RehashConfig:
        if "rehash" in data and "cache_point" not in data:  # a Plan's JSON
            data = data["rehash"]["config"] if "config" in (data["rehash"] or {}) else data["rehash"]
        sim = data.get("similarity")
        return cls(cache_point=data.get("cache_point", "auto"), schedule=Schedule.from_dict(data["schedule"]),
                   similarity=tuple(tuple(r) for r in sim) if sim is not None else None)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> RehashConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def as_config(rehash: Any) -> RehashConfig | None:
    """Normalise ``compile(..., rehash=...)``: None / False / "off"; True / "auto"; a RehashConfig; a
    ``fxstream.calibrate`` result (its chosen config); a dict; a path to a JSON file (a saved RehashConfig or
    Plan); a Schedule (cache point "auto")."""
    if rehash is None or rehash is False or rehash == "off":
        return None
    if rehash is True or rehash == "auto":
        return RehashConfig()
    if isinstance(rehash, RehashConfig):
        return rehash
    if isinstance(rehash, Schedule):
        return RehashConfig(schedule=rehash)
    if isinstance(getattr(rehash, "config", None), RehashConfig):  # a Calibration (not imported: a layer above)
        return rehash.config
    if isinstance(rehash, dict):
        return RehashConfig.from_dict(rehash)
    if isinstance(rehash, (str, Path)) and Path(rehash).suffix == ".json":
        if not Path(rehash).exists():
            raise ValueError(f"rehash: no such file {str(rehash)!r}")
        return RehashConfig.load(rehash)
    raise ValueError(
        f"rehash must be None, 'off', 'auto', a RehashConfig, a calibration, a Schedule, a dict or a .json path; "
        f"got {rehash!r}"
    )


# ------------------------------------------------------------------------------------------------ controller


class RehashController:
    """Decides, call by call, whether the compiled module runs its full or its partial graph."""

    def __init__(self, config: RehashConfig) -> None:
        self.config = config
        self.cache = FeatureCache()
        self.step: int = -1
        self._explicit: int | None = None
        self._last_timestep: float | None = None
        self._counting = False  # steps supplied by begin_generation: one call per step
        self.num_steps: int | None = None
        self.history: list[tuple[int, bool]] = []  # (step, full) of the current generation
        self._thread: int | None = None  # the thread whose generation this is (see next_call)

    # -- steps -------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation: drop the cache; the next call is step 0, its step inferred again."""
        self._new_generation()
        self._counting = False
        self.num_steps = None

    def _new_generation(self) -> None:
        self.cache.clear()
        self.step = -1
        self._explicit = None
        self._last_timestep = None
        self.history = []
        self._thread = None

    def set_schedule(self, schedule: Schedule) -> None:
        """Use another schedule from the next generation on (the cache point, and so the compiled graphs, stay)."""
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a Schedule, got {schedule!r}")
        self.config = dataclasses.replace(self.config, schedule=schedule, similarity=None)
        self.reset()

    def begin_generation(self, num_steps: int | None = None) -> None:
        """Start a new generation whose calls are its steps, one call per step, in order (what
        ``fxstream.optimize`` does when the pipeline sets its scheduler's timesteps). With ``num_steps``, the
        last step is always full."""
        self.reset()
        self._counting = True
        self.num_steps = num_steps

    def set_step(self, step: int) -> None:
        """Say which step the next call is (0 starts a new generation)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._explicit = step

    def next_call(self, timestep: Any, key: Any) -> bool:
        """Advance to the next call's step and say whether it is a full step. ``key`` names the compiled graph
        (a different input signature cannot reuse the cached feature). When the steps are counted
        (:meth:`begin_generation`) the timestep's value is not read: no device sync per step for a CUDA tensor."""
        t = None if self._counting else _timestep_value(timestep)
        if self._explicit is not None:
            step, self._explicit = self._explicit, None
        elif self._counting:
            step = self.step + 1
        else:
            later = self._last_timestep is not None and t is not None and t < self._last_timestep
            step = self.step + 1 if later else 0
        if step == 0 and self.history:
            self._new_generation()
        thread = threading.get_ident()
        if step > 0 and self._thread is not None and thread != self._thread:
            raise InterleavedGenerationError(
                f"Step Rehash: step {step} of a generation started by another thread was called from this one; "
                "its cached feature belongs to that generation. Compile one module per concurrent generation "
                "(fxstream.compile / fxstream.optimize on each pipeline)")
        self._thread = thread
        self.step, self._last_timestep = step, t
        last = self.num_steps is not None and step >= self.num_steps - 1
        full = (self.config.schedule.is_full(step) or last or self.cache.value is None
                or self.cache.key != key)
        if full:
            self.cache.clear()
            self.cache.key = key
        self.history.append((step, full))
        return full

    # -- what happened -----------------------------------------------------------------------------------------
    @property
    def full_steps_run(self) -> list[int]:
        return [s for s, full in self.history if full]

    @property
    def rehash_steps_run(self) -> list[int]:
        return [s for s, full in self.history if not full]

    def __repr__(self) -> str:
        return (f"RehashController(cache_point={self.config.cache_point!r}, "
                f"schedule={self.config.schedule.describe()!r}, step={self.step})")


def _timestep_value(timestep: Any) -> float | None:
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.reshape(-1)[0])
    try:
        return float(timestep)
    except (TypeError, ValueError):
        return None
