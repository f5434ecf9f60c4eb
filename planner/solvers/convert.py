"""Solution -> RoundPlan: the chosen round-0 sizes on concrete aligned blocks of idle GPUs.

Pinned work (a request, or a batch, that keeps its degree on its latent
block) goes first, on exactly that block. Everything else is placed largest
degree first on free aligned blocks that touch no pinned block. The model's
per-level buddy constraint (see ``cpsat/constraints.py``) counts exactly the
free aligned blocks left after the pinned ones, and taking a free k-block
removes exactly k/L free L-blocks for every L <= k, so largest-first placement
always succeeds, whichever free block it picks. The pick itself is a
preference order: the request's own node and latent GPUs, then GPUs that
hold no other paused request's latent (taking them would force a migration
later), then buddy best fit (keep big blocks whole), then the lowest index.

Short encodes and decodes go last: on a free GPU, else on a GPU of a diffuse
assignment (the smallest, preferably of a request that was not running),
which then waits for the next planning instant: the short stage's
completion, a few ms later.
"""
from __future__ import annotations

from planner.plan import Assignment, RoundPlan
from planner.request import Stage
from planner.solvers.options import RoundOptions
from planner.solvers.solution import Solution

_STAGES = {"encode": Stage.ENCODE, "diffuse": Stage.DIFFUSE, "decode": Stage.DECODE}


class PlacementError(RuntimeError):
    """The chosen sizes do not fit (a formulation bug; the policy falls back)."""


class _Free:
    def __init__(self, ro: RoundOptions) -> None:
        p = ro.problem
        self.nodes = p.nodes
        self.node_of = {g: n for n, node in enumerate(p.nodes) for g in node}
        self.local = {g: i for node in p.nodes for i, g in enumerate(node)}
        self.free = {g.index for g in p.gpus if g.free_in <= 1e-9}
        self.mem = {g.index: g.memory_free for g in p.gpus}
        # GPUs holding latents of other waiting requests that still diffuse.
        self.resident: dict[int, int] = {}
        for r in p.requests:
            if r.stage == "diffuse" and r.sp_prev > 0:
                for g in r.latent_gpus:
                    self.resident[g] = self.resident.get(g, 0) + 1

    def block_of(self, g: int, k: int) -> tuple[int, ...] | None:
        node = self.nodes[self.node_of[g]]
        if k > len(node):
            return None
        s = (self.local[g] // k) * k
        return tuple(node[s:s + k])

    def chunk(self, blk: tuple[int, ...]) -> int:
        size = len(blk)
        while True:
            parent = self.block_of(blk[0], 2 * size)
            if parent is None or not all(g in self.free for g in parent):
                return size
            size *= 2

    def take(self, k: int, prefer: tuple[int, ...], need: int, own: tuple[int, ...]) -> tuple[int, ...]:
        best, best_key = None, None
        pref_nodes = {self.node_of[g] for g in prefer}
        for node in self.nodes:
            for s in range(0, len(node) - k + 1, k):
                blk = tuple(node[s:s + k])
                if not all(g in self.free for g in blk):
                    continue
                if need and min(self.mem[g] for g in blk) < need:
                    continue
                overlap = sum(1 for g in blk if g in prefer)
                others = sum(self.resident.get(g, 0) - (1 if g in own else 0) for g in blk)
                key = (-(blk == prefer), -overlap, self.node_of[blk[0]] not in pref_nodes, others,
                       self.chunk(blk), blk[0])
                if best_key is None or key < best_key:
                    best, best_key = blk, key
        if best is None:
            raise PlacementError(f"no free aligned block of {k} GPUs")
        self.free.difference_update(best)
        return best


def to_plan(ro: RoundOptions, sol: Solution, name: str, stats: dict | None = None) -> RoundPlan:
    """The RoundPlan of ``sol``'s round 0."""
    opts, reqs = ro.options, ro.problem.requests
    reqs_by_id = {r.id: r for r in reqs}
    free = _Free(ro)
    out: list[Assignment] = []
    chosen0 = sol.round0(ro)
    singles = [i for i in chosen0 if opts[i].group < 0]
    by_group: dict[int, list[int]] = {}
    for i in chosen0:
        if opts[i].group >= 0:
            by_group.setdefault(opts[i].group, []).append(i)

    def rid(i: int) -> str:
        return reqs[opts[i].req].id

    def deadline(i: int) -> float:
        return reqs[opts[i].req].deadline

    # 1. Pinned work on its own block.
    for i in singles:
        o = opts[i]
        if o.pin is not None:
            if not all(g in free.free for g in o.pin):
                raise PlacementError(f"pinned block {o.pin} of {rid(i)} is not free")
            free.free.difference_update(o.pin)
            out.append(Assignment((rid(i),), Stage.DIFFUSE, tuple(o.pin), o.q))
    units: list[tuple[int, str, tuple[str, ...], int, tuple[int, ...], int, tuple[int, ...]]] = []
    for gi, members in sorted(by_group.items()):
        g = ro.groups[gi]
        members.sort(key=lambda i: (deadline(i), rid(i)))
        if g.pin is not None:
            if not all(x in free.free for x in g.pin):
                raise PlacementError(f"pinned block {g.pin} of a batch is not free")
            free.free.difference_update(g.pin)
            out.append(Assignment(tuple(rid(i) for i in members), Stage.DIFFUSE, tuple(g.pin), g.q))
            continue
        for s in range(0, len(members), g.max_batch):
            chunk = members[s:s + g.max_batch]
            lat = reqs[opts[chunk[0]].req].latent_gpus if opts[chunk[0]].migrate else ()
            act = max(opts[i].act for i in chunk)
            units.append((g.k, "diffuse", tuple(rid(i) for i in chunk), g.q, tuple(lat), act,
                          tuple(gg for i in chunk for gg in reqs[opts[i].req].latent_gpus)))
    # 2. Everything else, largest first; short stages last.
    shorts = [i for i in singles if opts[i].short]
    for i in singles:
        o = opts[i]
        if o.pin is not None or o.short:
            continue
        pr = reqs[o.req]
        prefer = tuple(pr.latent_gpus) if (o.stage == "decode" or o.migrate) else ()
        units.append((o.k, o.stage, (pr.id,), o.q if o.stage == "diffuse" else 0, prefer,
                      o.act if o.stage == "diffuse" else 0, tuple(pr.latent_gpus)))
    units.sort(key=lambda u: (-u[0], u[1] != "diffuse", u[2]))
    for k, stage, ids, q, prefer, act, own in units:
        blk = free.take(k, prefer, act, own)
        out.append(Assignment(ids, _STAGES[stage], blk, q))
    # 3. Short stages: a free GPU, else a GPU of a diffuse assignment, which is left for
    # the next planning instant (when the short stage ends); small assignments and those
    # of requests that were not running go first, so fewer pauses count as preemptions.
    running = {r.id for r in reqs if r.was_running}
    deferred = 0
    for i in sorted(shorts, key=lambda i: (deadline(i), rid(i))):
        o = opts[i]
        pr = reqs[o.req]
        prefer = tuple(pr.latent_gpus) if o.stage == "decode" else ()
        try:
            blk = free.take(1, prefer, 0, ())
        except PlacementError:
            victims = [j for j, a in enumerate(out) if a.stage is Stage.DIFFUSE]
            if not victims:
                continue  # nothing to share: it waits for the next planning instant
            j = min(victims, key=lambda j: (len(out[j].gpus), any(r in running for r in out[j].request_ids),
                                            -min(reqs_by_id[r].deadline for r in out[j].request_ids), j))
            victim = out.pop(j)
            free.free.update(victim.gpus)
            blk = free.take(1, prefer, 0, ())
            deferred += 1
        out.append(Assignment((pr.id,), _STAGES[o.stage], blk, 0))
    st = dict(stats or {})
    if deferred:
        st["deferred_for_short_stages"] = deferred
    return RoundPlan(tuple(out), solver=name, stats=st)
