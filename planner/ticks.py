"""Integer time of the CP-SAT models: ticks of ``TICK_S`` seconds (docs/architecture.md, "The schedule model").

The rolling schedule model (``planner/solvers/data.py``) and the offline
schedule (``planner/offline/schedule.py``) round alike: a duration up, so
the real work lies inside its reserved window, and a latest start down, so
a request on time in ticks is on time in seconds. ``_EPS`` only absorbs
float noise: a value within it of a whole tick rounds to that tick. At
1e-10 s it stays below the 1e-9 s within which the simulator sequences
segments (``planner.execution.EPS``) and a finish counts as on time.
"""
from __future__ import annotations

import math

TICK_S = 1e-3  # seconds per tick
_EPS = 1e-7  # ticks


def ticks_up(seconds: float) -> int:
    """``seconds`` rounded up to whole ticks, at least 0: a reserved length, an earliest start."""
    return max(0, math.ceil(seconds / TICK_S - _EPS))


def ticks_down(seconds: float) -> int:
    """``seconds`` rounded down to whole ticks: a latest start."""
    return math.floor(seconds / TICK_S + _EPS)
