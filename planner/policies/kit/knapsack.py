"""TetriServe's group knapsack over GPUs (arXiv 2510.01565): at most one choice per group."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ditplan.planner.plan import PlanStats


@dataclass(frozen=True, slots=True)
class KnapsackChoice:
    """One choice of a group: ``cost`` GPUs for ``value`` (on-time requests)."""

    cost: int
    value: float
    k: int = 0  # SP degree this choice stands for (0: skip)


@dataclass
class KnapsackStats(PlanStats):
    """A plan of a knapsack peer (tetriserve-dp, genserve)."""

    dp_groups: int = 0  # groups in the knapsack
    dp_value: float = 0.0  # its best value (on-time requests)
    paused: list[str] | None = None  # genserve: requests it preempted for a more urgent one
    batches: int | None = None  # genserve: batches of more than one request


def solve_group_knapsack(groups: Sequence[Sequence[KnapsackChoice]],
                         capacity: int) -> tuple[list[int | None], float, int]:
    """Pick at most one choice per group with total cost <= ``capacity``.

    Maximises total value, then minimises total cost. Returns (index of the
    chosen choice per group or None, value, cost). Among equally good plans,
    earlier groups get their earlier choices, so groups passed in deadline
    order favour urgent requests. O(groups x capacity x choices), integer
    costs >= 0.
    """
    n, width = len(groups), capacity + 1
    # Suffix tables: best (value, cost) of groups i.. within capacity c, at [i * width + c].
    val = [0.0] * ((n + 1) * width)
    cst = [0] * ((n + 1) * width)
    for i in range(n - 1, -1, -1):
        row, nxt = i * width, (i + 1) * width
        opts = groups[i]
        for c in range(width):
            bv, bc = val[nxt + c], cst[nxt + c]  # choose nothing
            for o in opts:
                if o.cost <= c:
                    v = o.value + val[nxt + c - o.cost]
                    w = o.cost + cst[nxt + c - o.cost]
                    if v > bv or (v == bv and w < bc):
                        bv, bc = v, w
            val[row + c], cst[row + c] = bv, bc
    choice: list[int | None] = []
    c = capacity
    for i in range(n):
        row, nxt = i * width, (i + 1) * width
        target_v, target_c = val[row + c], cst[row + c]
        pick = None
        for j, o in enumerate(groups[i]):
            if (o.cost <= c and o.value + val[nxt + c - o.cost] == target_v
                    and o.cost + cst[nxt + c - o.cost] == target_c):
                pick = j
                break
        choice.append(pick)
        if pick is not None:
            c -= groups[i][pick].cost
    return choice, (val[capacity] if n else 0.0), (cst[capacity] if n else 0)
