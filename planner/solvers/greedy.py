"""A fast feasible solution of the round formulation, used to warm-start the solvers.

Requests are taken by deadline (ones that can still make it first, then late
ones, running ones first, most overdue first). Each gets, round by round, the cheapest option
that keeps its projected finish on time, preferring its own latent block
(no migration) and, for a request that was running, any diffuse option over
none (no preemption); a request that cannot make it any more gets the
cheapest option of round 0 as best effort. Capacity is tracked with the same
per-level block counts as the model, so the result is feasible in it; with
it as a complete hint CP-SAT starts from a good incumbent instead of an empty
plan, which matters when the time limit is tight.
"""
from __future__ import annotations

from planner.solvers.options import Option, RoundOptions


class _Capacity:
    def __init__(self, ro: RoundOptions) -> None:
        self.ro = ro
        self.demand = [{L: 0 for L in ro.levels} for _ in range(ro.horizon)]
        self.pinned: set[int] = set()
        self.parents: set[tuple] = set()
        self.short = 0
        node_of = {g: n for n, node in enumerate(ro.problem.nodes) for g in node}
        self.parents_of: dict[tuple[int, ...], list[tuple]] = {}
        for key in ro.pin_parents:
            L, parent = key
            for blk in ro.pins:
                if len(blk) < L and node_of[blk[0]] == node_of[parent[0]] and set(blk) <= set(parent):
                    self.parents_of.setdefault(blk, []).append(key)

    def _delta(self, o: Option):
        ro = self.ro
        out = []
        for h in range(o.round, min(ro.horizon, o.round + o.span)):
            if h == 0 and o.pin is not None:
                for L in ro.levels:
                    if len(o.pin) >= L:
                        out.append((0, L, len(o.pin) // L))
                for key in self.parents_of.get(o.pin, ()):
                    if key not in self.parents:
                        out.append((0, key[0], 1))
            else:
                for L in ro.levels:
                    if o.k >= L:
                        out.append((h, L, o.k // L))
        return out

    def fits(self, o: Option) -> bool:
        if o.short:
            return self.short < self.ro.blocks[0].get(1, 0)
        if o.round == 0 and o.pin is not None and self.pinned.intersection(o.pin):
            return False
        add: dict[tuple[int, int], int] = {}
        for h, L, n in self._delta(o):
            add[h, L] = add.get((h, L), 0) + n
        return all(self.demand[h][L] + n <= self.ro.blocks[h][L] for (h, L), n in add.items())

    def take(self, o: Option) -> None:
        if o.short:
            self.short += 1
            return
        for h, L, n in self._delta(o):
            self.demand[h][L] += n
        if o.round == 0 and o.pin is not None:
            self.pinned.update(o.pin)
            self.parents.update(self.parents_of.get(o.pin, ()))


def greedy(ro: RoundOptions) -> tuple[list[int], dict[int, int]]:
    """(chosen option indices, steps of variable-step options): feasible in the model.

    Each request, in priority order, takes round by round the option of best
    marginal value under the model's weights (on track after the round,
    preemption avoided, migration, excess GPU-ms, progress), or none when
    nothing is worth more than waiting. A first pass only takes options that
    put a request on track; a second pass gives what is left to the others.
    A batched option joins an open group of its class for free, or opens one
    (its cost shared by the members it can expect) if a block is free.
    """
    g = _Greedy(ro)
    # EDF among requests that can make it; then late ones, running ones first (a pause is a
    # preemption), most overdue first.
    order = sorted(ro.reqs, key=lambda ri: (ri.late, ri.late and not ri.was_running, ri.dl, ri.index))
    served = set()
    for ri in order:
        if g.plan_request(ri, need_gain=True):
            served.add(ri.index)
    for ri in order:
        if ri.index not in served:
            g.plan_request(ri, need_gain=False)
    return g.chosen, g.qs


class _Greedy:
    def __init__(self, ro: RoundOptions) -> None:
        self.ro = ro
        self.cap = _Capacity(ro)
        self.chosen: list[int] = []
        self.qs: dict[int, int] = {}
        self.open_groups: dict[int, list[int]] = {}  # class -> members of its last open group

    def plan_request(self, ri, need_gain: bool) -> bool:
        ro = self.ro
        opts, R, H, W = ro.options, ro.R, ro.horizon, ro.weights
        done, clock = 0, ri.start
        encoded = ri.stage != "encode"
        busy_until = ri.first
        open_h = ri.onH is None and H > 1
        took = False
        for h in range(ri.first, H):
            if h < busy_until:
                continue
            pend = 0 if encoded else ri.enc
            wait = ri.rl[h]
            skip_proj = clock + wait + (ri.rem - done) * ri.ttail + ri.dec + pend
            skip_fast = clock + wait + (ri.rem - done) * ri.tmin + ri.dec + pend
            best, best_val = None, 0
            for i in ri.options[h]:
                o = opts[i]
                if o.stage == "diffuse":
                    if not encoded:
                        continue
                    q = (ri.rem - done) if o.var_q else o.q
                    if q < 1 or q > o.q or done + q > ri.rem:
                        continue
                    dur = o.dur + (o.step * q if o.var_q else 0)
                    own = o.step if o.var_q else ro.step_ticks(ri.index, o.k)
                    proj = clock + dur + (ri.rem - done - q) * (own if h == 0 else ri.ttail) + ri.dec
                    fast = clock + dur + (ri.rem - done - q) * ri.tmin + ri.dec
                elif o.stage == "encode":
                    if encoded:
                        continue
                    q, dur = 0, o.dur
                    proj = clock + dur + ri.rem * ri.ttail + ri.dec
                    fast = clock + dur + ri.rem * ri.tmin + ri.dec
                else:
                    q, dur = 0, o.dur
                    proj = fast = clock + dur
                members = self.open_groups.get(o.group, ()) if o.group >= 0 else ()
                joins = o.group >= 0 and len(members) % ro.groups[o.group].max_batch != 0
                if not joins and not self.cap.fits(o):
                    continue
                gain = int(proj <= ri.dl) - int(skip_proj <= ri.dl)
                gain0 = int(fast <= ri.dl) - int(skip_fast <= ri.dl)
                val = 0
                if h == 0 and ri.on0 is None:
                    val += ro.w_on0 * gain0
                if h == 0 and ri.onS is None:
                    val += ro.w_onS * gain
                if open_h:
                    val += ro.w_onH * gain
                if need_gain and val <= 0:
                    continue
                if h == 0:
                    if o.stage == "diffuse" and ri.was_running:
                        val += W.preemption
                    if o.migrate:
                        val -= W.migration
                    val += o.progress
                val -= W.gpu_ms * (o.excess + o.excess_step * q)
                if o.group >= 0 and not joins:
                    grp = ro.groups[o.group]
                    val -= W.gpu_ms * grp.cost // min(grp.max_batch, len(grp.members))
                if val > best_val:
                    best, best_val, best_q, best_dur, best_joins = o, val, q, dur, joins
            if best is None:
                clock += wait
                continue
            took = True
            if best.group >= 0:
                members = self.open_groups.setdefault(best.group, [])
                if not best_joins:
                    self.cap.take(best)
                    members.clear()
                members.append(best.index)
            else:
                self.cap.take(best)
            self.chosen.append(best.index)
            if best.var_q:
                self.qs[best.index] = best_q
            if best.stage == "encode":
                encoded = True
            done += best_q
            clock += best_dur
            busy_until = h + best.span
            if best.final:
                break
        return took
