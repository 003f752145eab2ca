"""``fxstream.calibrate``: measure how similar the candidate cache points are from step to step, once per
model, and choose where to cache and which steps to run in full.

    def generate(unet):                       # one full generation that calls ``unet``
        pipe.unet = unet
        pipe(image, num_inference_steps=25, generator=torch.Generator().manual_seed(0))

    cal = fxstream.calibrate(pipe.unet, generate, full_steps=13)
    cal.config.save("rehash.json")            # cache point + schedule (+ similarity map)
    pipe.unet = fxstream.compile(pipe.unet, budget_gb=8, rehash=cal.config)

The generations run the original module, eagerly, with forward hooks on the candidate modules (the outputs
of the decoder's temporal layers, :func:`passes.rehash.candidates`), whose outputs are copied to the CPU at
every step. ``similarity[path][i, j]`` is the cosine similarity of that output (the guidance batch together)
between steps i and j, averaged over the generations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxstream.runtime.rehash import RehashConfig, Schedule, schedule_for
from passes.rehash import CachePoint


@dataclass
class Calibration:
    """What :func:`calibrate` measured and recommends."""

    candidates: list[CachePoint]
    similarity: dict[str, torch.Tensor]  # path -> (N, N)
    num_steps: int
    full_steps: int
    gamma: float
    schedules: dict[str, Schedule]  # path -> the Algorithm 1 schedule with ``full_steps`` key steps
    min_similarity: dict[str, float]  # path -> lowest similarity of a rehash step to its anchor
    recommended: CachePoint

    @property
    def schedule(self) -> Schedule:
        return self.schedules[self.recommended.path]

    @property
    def config(self) -> RehashConfig:
        """The recommended cache point and schedule, ready for ``fxstream.compile(..., rehash=...)``."""
        sim = self.similarity[self.recommended.path]
        return RehashConfig(cache_point=self.recommended.path, schedule=self.schedule,
                            similarity=tuple(tuple(round(float(v), 6) for v in row) for row in sim))

    def rows(self) -> list[dict[str, Any]]:
        """One row per candidate: FLOPs skipped, similarity of adjacent steps, lowest similarity to anchor."""
        out = []
        for c in self.candidates:
            s = self.similarity[c.path]
            adjacent = [float(s[i, i - 1]) for i in range(1, self.num_steps)]
            out.append(dict(
                cache_point=c.path, module=c.module_class, skipped_flops=round(c.skipped_fraction, 4),
                mean_adjacent_similarity=round(sum(adjacent) / max(len(adjacent), 1), 5),
                min_similarity_to_anchor=round(self.min_similarity[c.path], 5),
                recommended=c.path == self.recommended.path,
            ))
        return out

    def table(self) -> str:
        from tabulate import tabulate

        return tabulate(self.rows(), headers="keys", tablefmt="github")


def anchor_similarity(similarity: torch.Tensor, schedule: Schedule) -> list[float]:
    """Similarity of each rehash step to the full step it reuses (the latest full step before it)."""
    n = similarity.shape[0]
    out, anchor = [], 0
    for i in range(n):
        if schedule.is_full(i):
            anchor = i
        else:
            out.append(float(similarity[i, anchor]))
    return out


def cosine_map(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, N) cosine similarities between flattened features."""
    flat = torch.stack([f.reshape(-1).double() for f in features])
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (flat @ flat.T).float()


def calibrate(
    unet: nn.Module,
    generate: Callable[[nn.Module], Any],
    *,
    full_steps: int | None = None,
    gamma: float = 0.95,
    generations: int = 1,
    cache_points: Sequence[str] | None = None,
) -> Calibration:
    """Run ``generations`` full generations and recommend a cache point and a schedule.

    Args:
        unet: the UNet (or an fxstream-compiled one: its original module is used).
        generate: runs one whole generation, calling the module it is given once per denoising step.
        full_steps: how many steps should run in full; default: half of them, rounded up (13 of 25).
        gamma: the similarity a rehash step must keep to the full step it reuses. The recommended cache point
            is the candidate that skips the most FLOPs while every rehash step of its schedule stays at or
            above ``gamma``; if none does, the candidate whose lowest similarity is highest (with a warning).
        generations: generations to average the similarity maps over (vary the seed inside ``generate``).
        cache_points: restrict the candidates to these module paths.
    """
    from fxstream.capture import capture
    from passes import rehash as rehash_pass

    module = getattr(unet, "original", unet)
    state: dict[str, Any] = {"capturing": False, "candidates": None}
    features: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def first_call(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        # On the first call: capture (the capture calls the module again: stand aside), find the candidates,
        # and hook them; the hooks fire from this call on.
        if state["candidates"] is not None or state["capturing"]:
            return
        state["capturing"] = True
        try:
            with torch.no_grad():
                gm = capture(module, *args, **kwargs)
        finally:
            state["capturing"] = False
        found = ([rehash_pass.resolve(gm, path) for path in cache_points] if cache_points is not None
                 else rehash_pass.candidates(gm))
        if not found:
            raise ValueError("calibrate: the model has no candidate cache point")
        state["candidates"] = found
        hooks.extend(_hook(module, c.path, features) for c in found)

    hooks.append(module.register_forward_pre_hook(first_call, with_kwargs=True))
    per_generation: dict[str, list[torch.Tensor]] = {}
    counts: list[int] = []
    try:
        for _ in range(generations):
            features.clear()
            with torch.no_grad():
                generate(module)
            if not features:
                raise ValueError("calibrate: generate() never called the module it was given")
            counts.append(len(next(iter(features.values()))))
            for path, feats in features.items():
                per_generation.setdefault(path, []).append(cosine_map(feats))
    finally:
        for h in hooks:
            h.remove()
    if len(set(counts)) != 1:
        raise ValueError(f"calibrate: generations had different step counts {counts}")
    num_steps = counts[0]
    if num_steps < 2:
        raise ValueError("calibrate: a generation needs at least 2 steps")
    full_steps = full_steps if full_steps is not None else math.ceil(num_steps / 2)
    similarity = {p: torch.stack(maps).mean(0) for p, maps in per_generation.items()}
    cands: list[CachePoint] = state["candidates"]
    schedules = {c.path: schedule_for(similarity[c.path], full_steps) for c in cands}
    min_sim = {}
    for c in cands:
        sims = anchor_similarity(similarity[c.path], schedules[c.path])
        min_sim[c.path] = min(sims) if sims else 1.0
    good = [c for c in cands if min_sim[c.path] >= gamma]
    if good:
        best = max(good, key=lambda c: c.skipped_fraction)
    else:
        best = max(cands, key=lambda c: min_sim[c.path])
        warnings.warn(
            f"calibrate: no cache point keeps similarity >= {gamma} with {full_steps} of {num_steps} full steps; "
            f"recommending {best.path} (lowest similarity {min_sim[best.path]:.4f})", stacklevel=2)
    return Calibration(cands, similarity, num_steps, full_steps, gamma, schedules, min_sim, best)


def _hook(module: nn.Module, path: str, features: dict[str, list[torch.Tensor]]):
    sub = module.get_submodule(path)

    def hook(_m: nn.Module, _args: tuple, output: Any) -> None:
        value = output
        while not isinstance(value, torch.Tensor):
            value = value[0] if isinstance(value, (tuple, list)) else getattr(value, "sample", None)
            if value is None:
                raise ValueError(f"calibrate: cannot find the tensor output of {path}")
        features.setdefault(path, []).append(value.detach().to("cpu", torch.float32, copy=True))

    return sub.register_forward_hook(hook)
