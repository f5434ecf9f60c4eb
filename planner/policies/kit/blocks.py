"""Aligned GPU blocks for one plan: which idle GPUs are still free, which to hand out.

An SP group is an aligned buddy block of k in {1, 2, 4, 8} GPUs inside one
node. Every policy builds one ``BlockAllocator`` per plan and takes blocks
from it, so no plan uses a busy GPU or a GPU twice. The choice of block is
what keeps a request's latent in place (``prefer``), keeps big blocks whole
for later (buddy best fit) and keeps memory legal (``need_bytes``).
"""
from __future__ import annotations

from functools import lru_cache

from ditplan.models.catalog import SP_DEGREES, Shape, get_model
from ditplan.planner.cluster import Cluster
from ditplan.planner.state import PlannerState


def block_of(cluster: Cluster, gpu: int, k: int) -> tuple[int, ...] | None:
    """The aligned block of ``k`` GPUs that contains ``gpu`` (None if its node is smaller)."""
    info = cluster.gpus[gpu]
    node = cluster.nodes[info.node]
    if k > len(node):
        return None
    start = (info.local // k) * k
    return node[start:start + k]


def is_aligned(cluster: Cluster, gpus: tuple[int, ...]) -> bool:
    """True when ``gpus`` is exactly one aligned block (cheaper than Cluster.is_block)."""
    k = len(gpus)
    if k not in SP_DEGREES or not 0 <= gpus[0] < cluster.size:
        return False
    return block_of(cluster, gpus[0], k) == tuple(gpus)


@lru_cache(maxsize=4096)
def _latent_bytes(model: str, shape: Shape) -> int:
    return get_model(model).latent_bytes(shape)


class BlockAllocator:
    """Free idle GPUs of one plan and the rule for choosing an aligned block.

    ``take(k, prefer)`` picks, among free blocks of size k (with enough memory
    headroom), the one ordered first by:

    1. most GPUs shared with ``prefer`` (exactly ``prefer`` when it is a free
       block of size k): the latent stays put or moves the least;
    2. fewest GPUs holding latents of *other* paused requests that still have
       to diffuse: taking them would force those requests to migrate;
    3. buddy best fit: the smallest fully free aligned block that contains the
       candidate, so larger blocks stay whole for large SP degrees;
    4. the node with the fewest free GPUs, then the lowest GPU index.
    """

    __slots__ = ("cluster", "_idle", "_free", "_node_free", "_node_of", "_headroom", "_resident_owner",
                 "_n_free")

    def __init__(self, state: PlannerState) -> None:
        cluster = state.cluster
        self.cluster = cluster
        now = state.now
        self._idle = tuple(t <= now for t in state.gpu_free_at)
        self._free = list(self._idle)
        self._node_of = [g.node for g in cluster.gpus]
        self._node_free = [sum(self._free[g] for g in node) for node in cluster.nodes]
        self._n_free = sum(self._node_free)
        # Memory headroom per GPU for activations, exactly as the plan checker
        # counts it: memory - resident weights - resident latents.
        weights = state.weight_bytes()
        self._headroom = [g.memory - weights[g.index] for g in cluster.gpus]
        # GPUs holding latents of paused requests that still diffuse there.
        self._resident_owner = [0] * cluster.size
        for r in state.requests:
            gpus = r.latent_gpus
            if not gpus or r.steps_done <= 0:
                continue
            req = r.request
            share = _latent_bytes(req.model, req.shape) // len(gpus)
            pending = not r.in_flight and r.steps_done < req.steps
            for g in gpus:
                self._headroom[g] -= share
                if pending:
                    self._resident_owner[g] += 1

    # --- queries -------------------------------------------------------------
    def free_count(self) -> int:
        return self._n_free

    def is_free(self, gpus: tuple[int, ...]) -> bool:
        free = self._free
        return all(free[g] for g in gpus)

    def free_gpus(self) -> list[int]:
        return [g for g, f in enumerate(self._free) if f]

    def headroom(self, gpus: tuple[int, ...]) -> int:
        """Bytes of activation memory the block can still hold per GPU."""
        return min(self._headroom[g] for g in gpus)

    def free_chunk(self, blk: tuple[int, ...]) -> int:
        """Size of the largest fully free aligned block containing the free block ``blk``."""
        size = len(blk)
        while True:
            parent = block_of(self.cluster, blk[0], 2 * size)
            if parent is None or not self.is_free(parent):
                return size
            size *= 2

    def largest_free_block(self) -> int:
        """Largest k with a free aligned block (0 if no GPU is free)."""
        for k in (8, 4, 2, 1):
            if k <= self._n_free and any(self.is_free(b) for b in self.cluster.blocks(k)):
                return k
        return 0

    # --- allocation ----------------------------------------------------------
    def peek(self, k: int, prefer: tuple[int, ...] = (), need_bytes: int = 0) -> tuple[int, ...] | None:
        """The block ``take`` would return, without taking it."""
        if k > self._n_free:
            return None
        cluster, free = self.cluster, self._free
        if (prefer and len(prefer) == k and self.is_free(prefer) and is_aligned(cluster, prefer)
                and self.headroom(prefer) >= need_bytes):
            return tuple(prefer)
        best, best_key = None, None
        for blk in cluster.blocks(k):
            node = self._node_of[blk[0]]
            nf = self._node_free[node]
            if nf < k or not all(free[g] for g in blk):
                continue
            if need_bytes and self.headroom(blk) < need_bytes:
                continue
            overlap = sum(1 for g in blk if g in prefer) if prefer else 0
            key = (-overlap, sum(self._resident_owner[g] for g in blk), self.free_chunk(blk), nf, blk[0])
            if best_key is None or key < best_key:
                best, best_key = blk, key
        return best

    def take(self, k: int, prefer: tuple[int, ...] = (), need_bytes: int = 0) -> tuple[int, ...] | None:
        """Take a free aligned block of ``k`` GPUs (see the class doc for which), or None."""
        blk = self.peek(k, prefer, need_bytes)
        if blk is not None:
            self._mark(blk, False)
        return blk

    def grow(self, block: tuple[int, ...], need_bytes: int = 0) -> tuple[int, ...] | None:
        """Double a block this plan holds into its aligned parent if the buddy half is free.

        Returns the parent block (now held) or None; the elastic scale-up of a
        work-conserving policy.
        """
        parent = block_of(self.cluster, block[0], 2 * len(block))
        if parent is None:
            return None
        buddy = tuple(g for g in parent if g not in block)
        if not self.is_free(buddy) or (need_bytes and self.headroom(parent) < need_bytes):
            return None
        self._mark(buddy, False)
        return parent

    def release(self, block: tuple[int, ...]) -> None:
        """Give back a block taken earlier in this plan (busy GPUs stay busy)."""
        self._mark(tuple(g for g in block if self._idle[g]), True)

    # --- internals -------------------------------------------------------------
    def _mark(self, gpus: tuple[int, ...], free: bool) -> None:
        delta = 1 if free else -1
        for g in gpus:
            if self._free[g] != free:
                self._free[g] = free
                self._node_free[self._node_of[g]] += delta
                self._n_free += delta
