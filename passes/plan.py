"""The Plan: a typed, versioned, JSON-serialisable record of what the compiler decided for one input signature.

A Plan is a recipe as well as a report: ``passes.pipeline.replay`` rebuilds the planned graph from it without
searching again (no budget search, no row-streaming search), after checking its ``fingerprint`` (the captured
graph's structure, the input signature and the target) against the graph at hand. Its decisions: each sliced
operator group (name, member nodes, axis, slice count), each row-streamed segment (first and last node, bands,
passes), the split reductions they imply, and the Step Rehash cache point with the rehash graph's slice counts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from fxstream.runtime.rehash import RehashConfig


# The format replay understands; a Plan of another version is planned again (or refused by replay).
PLAN_VERSION = 3


@dataclass
class GroupPlan:
    """One sliced operator group, or one row-streamed segment (``kind == "rows"``).

    name: the module path it runs in (unique within the plan); kind: spatial (frames), temporal (pixels),
    other, or rows; axis: the axis in words; length: the axis length; slices: slice count (bands, for rows);
    nodes: how many graph nodes it covers; intermediate_bytes: their values' bytes, unsliced.
    Decisions replay reads: ``dim`` and ``unit`` (the slice axis of the group's first node; for rows, the row
    dim of the segment's output), ``members`` (the node names of a group), ``start`` / ``end`` (a segment's
    input and output node names) and ``passes`` (passes over the slices or bands).
    """

    name: str
    kind: str
    axis: str
    length: int
    slices: int
    nodes: int
    intermediate_bytes: int
    dim: int | None = None
    unit: int = 1
    members: list[str] = field(default_factory=list)
    start: str = ""
    end: str = ""
    passes: int = 1


@dataclass
class RehashPlan:
    """The Step Rehash decision: the cache point (module path, class, graph node), the fraction of the graph's
    FLOPs a rehash step skips, the cached feature's bytes, the FLOPs of the full and partial graphs, the
    partial graph's predicted activation peak and its sliced groups (replayed as ``partial_groups``), and the
    :class:`~fxstream.RehashConfig` (cache point and schedule)."""

    cache_point: str
    module_class: str
    node: str
    skipped_fraction: float
    cached_bytes: int
    flops_full: int
    flops_partial: int
    partial_predicted_activation_peak_bytes: int
    partial_sliced_groups: int
    config: RehashConfig
    partial_groups: list[GroupPlan] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["config"] = self.config.to_dict()
        data["partial_groups"] = [asdict(g) for g in self.partial_groups]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RehashPlan:
        data = dict(data)
        data["config"] = RehashConfig.from_dict(data["config"])
        data["partial_groups"] = [GroupPlan(**g) for g in data.get("partial_groups", [])]
        return cls(**data)


@dataclass
class Plan:
    """What was decided, and the memory it predicts (bytes; peaks include resident weights)."""

    groups: list[GroupPlan]
    predicted_peak_bytes: int
    predicted_activation_peak_bytes: int
    baseline_peak_bytes: int
    baseline_activation_peak_bytes: int
    weight_bytes: int
    budget_bytes: int | None
    peak_node: str
    peak_module_path: str
    target: str
    signature: str = ""
    candidate_groups: int = 0
    split_reductions: int = 0
    notes: list[str] = field(default_factory=list)
    rehash: RehashPlan | None = None  # Step Rehash, when on
    # predicted seconds of one call, planned and eager (whole graph), by the time model (passes/timing.py) and
    # the device cost table named in ``time_model``; None in plans saved before the time model
    predicted_seconds: float | None = None
    baseline_seconds: float | None = None
    time_model: str = ""
    version: int = PLAN_VERSION
    fingerprint: str = ""  # of the captured graph, its input signature and target (passes.pipeline.fingerprint)
    # What the planner worked with, while this Plan is fresh (never saved): the graph that runs it and the
    # baseline and planned memory timelines (``graph_module``, ``baseline``, ``planned``). None once loaded.
    details: Any = field(default=None, repr=False, compare=False)

    @property
    def predicted_slowdown(self) -> float | None:
        """Predicted time of a call over eager's (the time model's), or None when not predicted."""
        if not self.predicted_seconds or not self.baseline_seconds:
            return None
        return self.predicted_seconds / self.baseline_seconds

    @property
    def sliced_groups(self) -> list[GroupPlan]:
        return [g for g in self.groups if g.slices > 1]

    def chunks(self) -> dict[str, int]:
        return {g.name: g.slices for g in self.groups}

    def to_dict(self) -> dict:
        data = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in ("details", "rehash")}
        data["rehash"] = self.rehash.to_dict() if self.rehash is not None else None
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        data = dict(data)
        data.setdefault("version", 1)  # written before plans were versioned
        data["groups"] = [GroupPlan(**g) for g in data["groups"]]
        if data.get("rehash") is not None:
            data["rehash"] = RehashPlan.from_dict(data["rehash"])
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Plan:
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        return cls.from_dict(json.loads(text))


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
