"""Whether blocks of given SP degrees fit the free aligned blocks, by counts alone."""
from __future__ import annotations

from collections import Counter

from ditplan.models.catalog import SP_DEGREES
from ditplan.planner.policies.kit.blocks import BlockAllocator


def level_capacity(alloc: BlockAllocator) -> dict[int, int]:
    """Per degree j: how many aligned j-blocks are entirely free."""
    cluster = alloc.cluster
    return {j: sum(1 for b in cluster.blocks(j) if alloc.is_free(b))
            for j in SP_DEGREES if j <= cluster.max_node_gpus}


def packing_fits(degrees: Counter, caps: dict[int, int]) -> bool:
    """Can blocks of these degrees all be placed (largest first) on the free aligned blocks?

    Exact for buddy blocks: placing a d-block uses d/j free j-blocks for
    every j <= d, so largest-first succeeds iff for every level j the demand
    sum over d >= j of n_d * d / j fits the free j-blocks.
    """
    for j, cap in caps.items():
        if sum(n * (d // j) for d, n in degrees.items() if d >= j) > cap:
            return False
    return all(d in caps for d, n in degrees.items() if n)
