"""Online refinement of step times from measured reports.

See docs/architecture.md, "Profiles and cost refinement".

Executors report the measured seconds of every diffuse step they run. ``StepRefiner`` keeps, per
``StepKey`` (model, shape, SP degree, batch), a correction *factor*: measured seconds / the cost
model's prior (profile or roofline) for the block that ran them, so one factor serves blocks with
different links. Each report counts once (the median of its steps). The factor follows the median
of the last ``window`` reports' ratios, and one report moves it by at most ``max_step`` (a factor)
either way: an outlier, even a 100x one, shifts it at most that much, and a lone outlier among
ordinary reports leaves the median among theirs. A key's factor is applied
(``CostModel.with_corrections``) once it has ``min_reports`` reports; before that the prior stands.
Keys are exact: a shape, degree or batch never reported keeps its prior.

From a prior wrong by a factor ``c``, reports at the true time bring the factor to the truth in
``ceil(log c / log max_step)`` reports (defaults: 2x wrong is within 2.4% after 3 reports, exact
after 4; ``tests/test_refine.py``).
"""
from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ditplan.models.catalog import Shape


class StepKey(NamedTuple):
    """What a step time is refined for; equal to the tuple ``CostModel`` keys its corrections by."""

    model: str
    shape: Shape
    sp: int
    batch: int


@dataclass(frozen=True)
class RefineConfig:
    window: int = 15  # reports per key the median is taken over
    min_reports: int = 3  # reports before a key's factor replaces its prior
    max_step: float = 1.25  # one report moves a factor by at most this factor
    max_keys: int = 4096  # keys kept; beyond, the least recently reported is forgotten

    def __post_init__(self) -> None:
        for name, low in (("window", 1), ("min_reports", 1), ("max_keys", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"refine {name} = {value!r} must be an integer >= {low}")
        if not (math.isfinite(self.max_step) and self.max_step > 1.0):
            raise ValueError(f"refine max_step = {self.max_step!r} must be a finite factor > 1")


@dataclass(frozen=True)
class StepEstimate:
    """One key's refinement as the service shows it."""

    key: StepKey
    seconds: float  # refined step time on the block last reported (prior_s x factor)
    prior_s: float  # the cost model's prior for that block
    factor: float
    reports: int
    in_use: bool  # enough reports: the planner plans with ``seconds``


@dataclass
class _Track:
    ratios: deque
    prior_s: float = 0.0
    factor: float = 1.0
    reports: int = 0


@dataclass
class StepRefiner:
    """Per-key step-time corrections from reports. Not thread-safe (the service core locks)."""

    config: RefineConfig = field(default_factory=RefineConfig)
    version: int = 0  # grows whenever ``corrections()`` changes
    _tracks: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def observe(self, key: StepKey, seconds: float, prior_s: float) -> bool:
        """One report for ``key``: its measured step time and the prior for the block it ran on.
        Whether ``corrections()`` changed. Non-positive or non-finite values are ignored."""
        if not (math.isfinite(seconds) and seconds > 0 and math.isfinite(prior_s) and prior_s > 0):
            return False
        cfg = self.config
        track = self._tracks.get(key)
        changed = False
        if track is None:
            track = self._tracks[key] = _Track(deque(maxlen=cfg.window))
            if len(self._tracks) > cfg.max_keys:
                _, old = self._tracks.popitem(last=False)
                changed = old.reports >= cfg.min_reports
        else:
            self._tracks.move_to_end(key)
        track.ratios.append(seconds / prior_s)
        track.reports += 1
        track.prior_s = prior_s
        target = statistics.median(track.ratios)
        factor = min(max(target, track.factor / cfg.max_step), track.factor * cfg.max_step)
        if track.reports >= cfg.min_reports and (factor != track.factor or track.reports == cfg.min_reports):
            changed = True
        track.factor = factor
        if changed:
            self.version += 1
        return changed

    def corrections(self) -> dict[StepKey, float]:
        """The factors in use: keys with at least ``min_reports`` reports."""
        n = self.config.min_reports
        return {k: t.factor for k, t in self._tracks.items() if t.reports >= n}

    def estimate(self, key: StepKey) -> StepEstimate | None:
        t = self._tracks.get(key)
        if t is None:
            return None
        return StepEstimate(key, t.prior_s * t.factor, t.prior_s, t.factor, t.reports,
                            t.reports >= self.config.min_reports)

    def estimates(self) -> list[StepEstimate]:
        """Every key's estimate, by model, shape, degree and batch."""
        return [self.estimate(k) for k in sorted(self._tracks)]
