"""Schedule -> RoundPlan: commit the work that starts now, fill spare capacity, reject what is lost.

* **On-time work.** Every present job whose chain starts at tick 0 starts
  its next stage now: encode on ``block[0]`` (or the GPU that encodes
  apart), decode on ``block[0]``, or at
  most ``piece_s`` seconds of diffuse steps on the whole block, so the next
  step boundary plans again (that is where preemption and elastic SP
  happen).
* **Best effort.** Requests in no present job (they cannot be on time, or the
  schedule gave their capacity to requests that can) run only in *gaps*:
  idle GPUs the schedule does not use now, for no longer than the time until
  the schedule next needs them. So late work never delays on-time work.
  Requests that can still make their deadline go first (earliest deadline),
  then late ones, least work left first; each runs at its most GPU-efficient
  degree, batched with requests in the same state.
* **Reject.** With ``late="reject"`` a request that cannot make its
  deadline whatever the plan (:func:`~planner.solvers.data.is_lost`) is
  rejected now with a reason, instead of served late.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from ditplan.planner.placement import WeightLoad
from ditplan.planner.plan import Assignment
from ditplan.planner.problem import ProblemRequest, RoundProblem
from ditplan.planner.request import Stage
from ditplan.planner.solvers.data import (ScheduleData, aligned_blocks, group_cost, has_latent, is_lost, kept_degrees,
                                          load_plan)
from ditplan.planner.solvers.solution import Schedule
from ditplan.planner.ticks import TICK_S

LATE_MODES = ("serve", "reject")


def piece_steps(step_s: float, piece_s: float, rem: int) -> int:
    """Diffuse steps committed at once: about ``piece_s`` seconds, at least one."""
    return max(1, min(rem, math.floor(piece_s / step_s + 1e-9)))


@dataclass
class Gaps:
    """Idle GPUs and, for each, seconds until the schedule needs it (inf: never)."""

    until: dict[int, float]

    def take(self, blk: Sequence[int]) -> None:
        for g in blk:
            del self.until[g]

    def split(self, gpus: Iterable[int]) -> "Gaps":
        """Remove ``gpus`` from these gaps; return the gaps they had."""
        gpus = set(gpus)
        return Gaps({g: self.until.pop(g) for g in sorted(self.until) if g in gpus})


@dataclass
class Committed:
    """What one plan starts now."""

    assignments: list[Assignment] = field(default_factory=list)
    loads: list[WeightLoad] = field(default_factory=list)
    unloads: list[WeightLoad] = field(default_factory=list)


def weight_load(g: int, w: str) -> WeightLoad:
    """The WeightLoad of GPU ``g`` and a ``model/component`` name (the problem data's spelling)."""
    model, component = w.split("/")
    return WeightLoad(g, model, component)


def commit_on_time(data: ScheduleData, sched: Schedule, problem: RoundProblem, piece_s: float,
                   gaps: Gaps, out: Committed) -> None:
    """Add the work of the present jobs that starts now to ``out``; marks the GPUs it uses.

    A job whose alternative loads weights first starts its loads (and the
    evictions that make room) now; its work starts once they are in, at a
    later planning instant."""
    waiting = {r.id for r in problem.requests}
    for j, (a, s) in sorted(sched.placed.items()):
        job, alt = data.jobs[j], data.jobs[j].alts[a]
        for g, s0, _ in data.job_intervals(j, a, s):
            if s0 > 0 and g in gaps.until:
                gaps.until[g] = min(gaps.until[g], s0 * TICK_S)
        if s != 0 or job.in_flight or any(rid not in waiting for rid in job.ids):
            continue
        apart = job.stage is Stage.ENCODE and alt.encode_gpu >= 0
        if apart:  # the encode runs now on its own GPU, whether or not the block loads meanwhile
            out.assignments.append(Assignment(job.ids, Stage.ENCODE, (alt.encode_gpu,), 0))
            gaps.take((alt.encode_gpu,))
        if alt.loads:
            model = problem.requests_by_id[job.ids[0]].model
            out.unloads += [weight_load(g, w) for g, w in alt.evicts]
            out.loads += [WeightLoad(g, model, c) for g, c in alt.loads]
            gaps.take(alt.block)
            continue
        if apart:
            continue
        if job.stage is Stage.DIFFUSE:
            q = piece_steps(alt.step_s, piece_s, job.min_rem or job.rem)
            out.assignments.append(Assignment(job.ids, Stage.DIFFUSE, alt.block, q))
            gaps.take(alt.block)
        else:
            out.assignments.append(Assignment(job.ids, job.stage, (alt.block[0],), 0))
            gaps.take((alt.block[0],))


def _fill_one(pr: ProblemRequest, mates: list[ProblemRequest], problem: RoundProblem, gaps: Gaps,
              piece_s: float, reserved: Mapping[int, str] = {}) -> Assignment | None:
    """Best-effort work of ``pr`` (with ``mates`` in the same state) in the gaps, or None; GPUs
    ``reserved`` for another model are left out."""
    if any(reserved.get(g, pr.model) != pr.model for g in gaps.until):
        view = Gaps({g: u for g, u in gaps.until.items() if reserved.get(g, pr.model) == pr.model})
        a = _fill_one(pr, mates, problem, view, piece_s)
        if a is not None:
            gaps.take(a.gpus)
        return a
    ids = tuple(r.id for r in [pr, *mates])
    b = len(ids)
    gc = group_cost([pr, *mates], problem)
    if gc is None:
        return None
    if pr.stage is not Stage.DIFFUSE:
        dur = gc.enc if pr.stage is Stage.ENCODE else gc.dec
        cands = [g for g, u in gaps.until.items()
                 if u >= dur - 1e-12 and problem.runs((g,), pr.model, pr.stage)]
        if not cands:
            return None
        own = [g for g in cands if g in pr.latent_gpus]
        g = min(own or cands, key=lambda g: (gaps.until[g], g))  # the tightest gap that fits
        gaps.take((g,))
        return Assignment(ids, pr.stage, (g,), 0)
    step = gc.step
    node_of = problem.node_of
    mem = {g.index: g.memory_free for g in problem.gpus}
    movers = [r for r in (pr, *mates) if has_latent(r)]
    best = None
    own = tuple(pr.latent_gpus) if has_latent(pr) and not mates else ()
    degrees = sorted(kept_degrees(step), key=lambda k: (k * step[k], k))  # most GPU-efficient first
    if own and len(own) in step and all(g in gaps.until for g in own):
        degrees = [len(own)] + [k for k in degrees if k != len(own)]  # its own block: no migration
    for k in degrees:
        need = gc.act[k] + b
        for blk in aligned_blocks(list(gaps.until), problem.nodes, k):
            if min(mem[g] for g in blk) < need or not problem.runs(blk, pr.model, Stage.DIFFUSE):
                continue
            move = max([r.move_s[node_of[blk[0]]] for r in movers if set(r.latent_gpus) != set(blk)],
                       default=0.0)
            room = min(gaps.until[g] for g in blk) - move
            if room < step[k] - 1e-12:
                continue
            q = piece_steps(step[k], piece_s, gc.min_rem)
            if room < q * step[k]:
                q = math.floor(room / step[k] + 1e-9)
            mine = sum(g in pr.latent_gpus for g in blk)
            key = (-mine, min(gaps.until[g] for g in blk), blk)
            if best is None or key < best[0]:
                best = (key, blk, q)
        if best is not None:
            break
    if best is None:
        return None
    _, blk, q = best
    gaps.take(blk)
    return Assignment(ids, Stage.DIFFUSE, blk, q)


def fill_best_effort(candidates: Sequence[ProblemRequest], problem: RoundProblem, gaps: Gaps,
                     piece_s: float, batching: bool = True, share: float = 1.0,
                     reserved: Mapping[int, str] = {}) -> list[Assignment]:
    """Best-effort work in the gaps (see the module doc); at most ``share`` of a node's GPUs hold it,
    and a GPU ``reserved`` for a model only that model's. Late work batches only requests in one state:
    CSP batches of late work measured no gain on patchedserve-mixed and cost coserve-mixed 4 points."""
    if share < 1.0:
        held = [0] * len(problem.nodes)
        for r in problem.in_flight:
            if is_lost(r):
                for g in r.latent_gpus:
                    held[problem.node_of[g]] += 1
        # Keep the gaps late work can use: GPUs holding candidates' latents or weights first.
        use = {g.index: 0 for g in problem.gpus}
        for r in candidates:
            for g in use:
                if reserved.get(g, r.model) == r.model:
                    use[g] += (g in r.latent_gpus) + problem.runs((g,), r.model, r.stage)
        for n, node in enumerate(problem.nodes):
            room = max(1, math.floor(share * len(node))) - held[n]  # late work always progresses
            free = sorted((g for g in node if g in gaps.until), key=lambda g: (use[g], -g))
            for g in free[:max(0, len(free) - max(0, room))]:
                del gaps.until[g]
    order = sorted(candidates, key=lambda r: (is_lost(r), r.deadline if not is_lost(r) else r.remaining_lb(),
                                              r.id))
    done: set[str] = set()
    out = []
    for pr in order:
        if pr.id in done or not gaps.until:
            continue
        mates: list[ProblemRequest] = []
        if batching and pr.stage is not Stage.DECODE and pr.max_batch > 1:
            same = [r for r in order if r.id != pr.id and r.id not in done and _same_state(r, pr)]
            mates = same[:pr.max_batch - 1]
        a = _fill_one(pr, mates, problem, gaps, piece_s, reserved)
        if a is None and mates:
            mates = []
            a = _fill_one(pr, mates, problem, gaps, piece_s, reserved)
        if a is not None:
            out.append(a)
            done.update(a.request_ids)
    return out


def load_stranded(candidates: Sequence[ProblemRequest], problem: RoundProblem, gaps: Gaps,
                  out: Committed, reserved: Mapping[int, str] = {}) -> None:
    """Load the weights of best-effort requests whose next stage no GPU can run, onto a gap GPU.

    On-time work loads what it needs through the schedule; late work only
    runs where weights already are, so a model resident nowhere (or only on
    GPUs ``reserved`` for another model, or without room for its
    activations next to other weights) would wait for ever. One GPU per
    stranded model, the gap that lasts longest."""
    done: set[str] = set()
    mem = {g.index: g.memory_free for g in problem.gpus}
    for pr in sorted(candidates, key=lambda r: (r.deadline, r.id)):
        if pr.model in done or not gaps.until:
            continue
        need = pr.act_bytes[min(pr.act_bytes)] + 1 if pr.stage is not Stage.DECODE else 0
        if any(problem.runs((g.index,), pr.model, pr.stage) and mem[g.index] >= need for g in problem.gpus
               if reserved.get(g.index, pr.model) == pr.model):
            continue
        for g in sorted(gaps.until, key=lambda g: (-gaps.until[g], g)):
            loads, _, evicts = load_plan(problem, (g,), pr.model, pr.stage, need, mem)
            if loads:
                out.unloads += [weight_load(x, w) for x, w in evicts]
                out.loads += [WeightLoad(x, pr.model, c) for x, c in loads]
                gaps.take((g,))
                done.add(pr.model)
                break


def _same_state(a: ProblemRequest, b: ProblemRequest) -> bool:
    return (a.batch_key, a.stage, a.steps_done) == (b.batch_key, b.stage, b.steps_done) and \
        (not has_latent(a) or tuple(a.latent_gpus) == tuple(b.latent_gpus))


def rejections(problem: RoundProblem, late: str, grace_s: float = 0.0) -> list[tuple[str, str]]:
    """(id, reason) of the waiting requests to reject now (``late="reject"`` only).

    ``grace_s``: reject only requests that would miss by more than this. A
    service on the wall clock sets it, since a request exactly on schedule
    there looks a little late once planning latency has passed."""
    if late not in LATE_MODES:
        raise ValueError(f"late must be one of {', '.join(LATE_MODES)}, not {late!r}")
    if late == "serve":
        return []
    out = []
    for r in problem.requests:
        if is_lost(r, grace_s):
            need = r.remaining_lb()
            out.append((r.id, f"cannot meet its deadline: needs {need:.3f} s at the fastest degree, "
                              f"{max(0.0, r.deadline):.3f} s left"))
    return out


def idle_gaps(problem: RoundProblem) -> Gaps:
    return Gaps({g.index: math.inf for g in problem.gpus if g.free_in <= 1e-9})
