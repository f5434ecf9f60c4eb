"""The schedule of all remaining work: problem data every backend reads.

At a planning instant every live request (waiting or in flight) has some
work left: encode (if not yet encoded), its remaining diffuse steps, decode.
The schedule model (docs/architecture.md, "The schedule model") plans all of
it at once. A *job* is one request, or a batch of compatible requests that
share every forward pass; a job is either *on time* (present in the
schedule) or left out (best effort, see ``planner/solvers/commit.py``).

A present job runs its remaining work as one tight chain on one aligned
block ``b`` of ``k`` GPUs inside one node (an *alternative*):

    b[0]:   [ encode | latent move + steps at degree k ...... | decode ]
    b[1:]:           [ latent move + steps at degree k ...... ]

so it holds ``b[0]`` for ``span`` ticks from its start ``s`` and the other
GPUs for ``diff`` ticks from ``s + lead``. A fresh request may also encode
apart, on a GPU ``e`` of the node that holds its text encoders while ``b``
does not (text encoders are large and run once: stage-level placement):

    e:      [ encode ]
    b[0]:            [ embeddings move + steps ...... | decode ]
    b[1:]:           [ embeddings move + steps ...... ]

``Alt.holds`` lists every (GPU, offset, ticks) either shape holds. Only the work that starts now
is committed; the next step boundary plans again, so a preemption is just the
remaining chain starting later, maybe at another degree.

Time is in integer ticks (``planner/ticks.py``) from now. Reserved windows are
rounded *outwards* (the real work lies inside them), while the on-time test
is exact in seconds: alternative ``a`` is on time iff its start tick ``s``
satisfies ``s * TICK_S + chain_s(a) <= deadline``, which is the integer
bound ``s <= latest(a)``. So an on-time claim holds in real seconds (noise
free), also at zero slack.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ditplan.models import csp
from ditplan.models.catalog import get_model
from ditplan.planner.problem import ProblemRequest, RoundProblem
from ditplan.planner.request import Stage
from ditplan.planner.ticks import TICK_S, ticks_down, ticks_up


@dataclass(frozen=True)
class Weights:
    """Objective weights (maximised); each tier dominates every realistic total of the tiers below.

    1. ``on_time`` per request on time;
    2. ``preemption`` per request paused at this step boundary that does not
       continue now; ``migration`` per request whose latent moves; ``load``
       per GPU that loads weights;
    3. ``gpu_ms`` per GPU-ms the schedule uses and ``finish_ms`` per ms of
       each present request's finish time: cheap degrees, then early
       finishes (work that can start now does not wait).
    """

    on_time: int = 1_000_000_000_000
    preemption: int = 1_000_000_000
    migration: int = 1_000_000_000
    load: int = 1_000_000_000  # per GPU that loads weights (it evicts what another request may need)
    gpu_ms: int = 1
    finish_ms: int = 1


@dataclass(frozen=True)
class Alt:
    """One way to run a job's remaining chain: an aligned block and its timing in ticks."""

    block: tuple[int, ...]  # block[0] also runs encode and decode
    lead: int  # ticks from the job's start until the other GPUs are needed (the encode)
    diff: int  # ticks the other GPUs are held (latent move + steps)
    span: int  # ticks block[0] is held (the whole chain)
    latest: int  # latest start tick that finishes by the deadline (exact in seconds)
    gpu_ms: int  # GPU-ticks the alternative holds
    migrate: bool  # moves a diffuse latent onto another block
    step_s: float  # seconds per diffuse step here
    move_s: float  # seconds of the latent move
    # Weights to load first, (gpu, component), and the seconds that takes (the
    # loads of one GPU run one after another, GPUs in parallel). A loading
    # alternative holds its whole block from its start.
    loads: tuple[tuple[int, str], ...] = ()
    load_s: float = 0.0
    evicts: tuple[tuple[int, str], ...] = ()  # (gpu, "model/component") unloaded to make room
    encode_gpu: int = -1  # the GPU that encodes apart from the block (-1: block[0] encodes)
    encode: int = 0  # ticks that GPU is held from the start

    @property
    def holds(self) -> tuple[tuple[int, int, int], ...]:
        """(GPU, offset from the start, ticks) of every interval the alternative holds."""
        if self.encode_gpu < 0:
            return ((self.block[0], 0, self.span), *((g, self.lead, self.diff) for g in self.block[1:]))
        return ((self.encode_gpu, 0, self.encode), (self.block[0], self.lead, self.span - self.lead),
                *((g, self.lead, self.diff) for g in self.block[1:]))

    @property
    def loading_gpus(self) -> int:
        return len({g for g, _ in self.loads})

    @property
    def k(self) -> int:
        return len(self.block)


@dataclass(frozen=True)
class Job:
    index: int
    ids: tuple[str, ...]  # one request, or a batch (deadline order)
    stage: Stage  # next stage
    rem: int  # diffuse steps left
    release: int  # tick from which it may start (in flight: when its segment ends)
    deadline_s: float  # the earliest member deadline, seconds from now
    alts: tuple[Alt, ...]
    running: int  # members paused at this step boundary (not starting now preempts them)
    in_flight: bool
    min_rem: int = 0  # the fewest diffuse steps any member has left (a CSP batch's members may differ)

    @property
    def weight(self) -> int:
        return len(self.ids)

    @property
    def key(self) -> tuple[str, ...]:
        return self.ids


@dataclass(frozen=True)
class ScheduleData:
    """One scope's schedule problem (a node, or the whole cluster)."""

    gpus: tuple[int, ...]
    busy: dict[int, int]  # GPU -> ticks until its in-flight work ends (0: idle now)
    jobs: tuple[Job, ...]
    members: dict[str, tuple[int, ...]]  # request id -> jobs it belongs to
    weights: Weights = Weights()
    horizon: int = 0  # no present interval ends after this tick

    def job_intervals(self, j: int, a: int, start: int) -> list[tuple[int, int, int]]:
        """(gpu, start, end) ticks the job holds on alternative ``a`` starting at ``start``."""
        return [(g, start + off, start + off + n) for g, off, n in self.jobs[j].alts[a].holds]


@dataclass(frozen=True)
class ScheduleParams:
    """How the schedule data is built (see :func:`build_schedule`)."""

    batching: bool = True
    max_jobs: int = 48  # jobs per scope; the most urgent waiting ones beyond in-flight work
    weights: Weights = Weights()
    csp: bool = True  # offer mixed-resolution CSP batches of the models that have them
    # Offer only degrees whose parallel efficiency against the smallest one is at least this (0: every
    # degree that is faster): when the cluster is saturated, a GPU-second spent on a wide block is
    # one a later request lacks (``planner/policies/solver.py``).
    min_efficiency: float = 0.0
    csp_seeds: int = 3  # CSP batches grown from each of this many most urgent members of a group


def kept_degrees(step: dict[int, float]) -> list[int]:
    """Degrees strictly faster than every smaller one (a bigger k that is not faster is dominated)."""
    kept, best = [], math.inf
    for k in sorted(step):
        if step[k] < best * (1 - 1e-9):
            kept.append(k)
            best = step[k]
    return kept


def efficient_degrees(step: dict[int, float], min_efficiency: float = 0.0) -> list[int]:
    """:func:`kept_degrees` whose parallel efficiency against the smallest, ``(T_k0 / T_k) x k0 / k``,
    is at least ``min_efficiency``."""
    kept = kept_degrees(step)
    if min_efficiency <= 0 or not kept:
        return kept
    k0 = kept[0]
    return [k for k in kept if step[k0] / step[k] * k0 / k >= min_efficiency - 1e-9]


def aligned_blocks(gpus: Sequence[int], nodes: Sequence[Sequence[int]], k: int) -> list[tuple[int, ...]]:
    """Aligned blocks of ``k`` GPUs inside one node, all of them in ``gpus``."""
    inside = set(gpus)
    out = []
    for node in nodes:
        for s in range(0, len(node) - k + 1, k):
            blk = tuple(node[s:s + k])
            if all(g in inside for g in blk):
                out.append(blk)
    return out


def has_latent(pr: ProblemRequest) -> bool:
    """A diffuse latent lives on ``latent_gpus``: running elsewhere moves it."""
    return pr.steps_done > 0 and bool(pr.latent_gpus)


def lower_bound_s(pr: ProblemRequest) -> float:
    """Seconds from now to finish at the fastest degree on free GPUs (no contention)."""
    return pr.ready_in + pr.remaining_lb()


def is_lost(pr: ProblemRequest, grace_s: float = 0.0) -> bool:
    """Cannot make its deadline whatever the plan (noise free), even ``grace_s`` late."""
    return lower_bound_s(pr) > pr.deadline + 1e-9 + grace_s


@dataclass
class _Member:
    pr: ProblemRequest
    running: bool
    in_flight: bool


def chain_parts(stage: Stage, enc: float, move: float, rem: int, step: float, dec: float
                ) -> tuple[float, float, float]:
    """(encode, diffuse, decode) seconds of a remaining chain from ``stage``."""
    if stage is Stage.DECODE:
        return 0.0, 0.0, dec
    return (enc if stage is Stage.ENCODE else 0.0), move + rem * step, dec


def _may_decode(g: int, pr: ProblemRequest, reserved: Mapping[int, str]) -> bool:
    """``g`` is not reserved for another model, or the latent lives there (a job may finish where it
    runs; ``planner/solvers/reserve.py``)."""
    return reserved.get(g, pr.model) == pr.model or g in pr.latent_gpus


@dataclass(frozen=True)
class GroupCost:
    """What a job's members cost when they run together."""

    step: dict[int, float]  # SP degree -> seconds per diffuse step
    enc: float  # seconds of their encode
    dec: float  # seconds of their decode
    act: dict[int, int]  # SP degree -> activation bytes per GPU
    rem: int  # diffuse steps of the chain: the most any member has left
    min_rem: int  # the fewest


def _same_shape_batch(prs: Sequence[ProblemRequest]) -> bool:
    lead = prs[0]
    return all(p.batch_key == lead.batch_key and p.remaining_steps == lead.remaining_steps for p in prs) \
        and len(prs) <= lead.max_batch


def _stage_s(prs: Sequence[ProblemRequest], stage: str) -> float:
    """Seconds of the encode or decode of ``prs`` in one CSP batch: per batch key, in batches of its limit."""
    by_key = {p.batch_key: p for p in prs}
    total = 0.0
    for key, n in csp.shape_groups([p.batch_key for p in prs], lambda key: by_key[key].max_batch):
        p = by_key[key]
        if stage == "encode":
            total += p.encode_s if n == 1 else p.batch_encode_s[n]
        else:
            total += p.decode_s if n == 1 else p.batch_decode_s[n]
    return total


def group_cost(prs: Sequence[ProblemRequest], problem: RoundProblem) -> GroupCost | None:
    """The cost of ``prs`` as one job: a request, a same-shape batch (the cost model's batched times)
    or a CSP batch (the problem's CSP predictor; encode and decode per batch key, ``models/csp.py``).
    None: they cannot share a forward pass."""
    lead, b = prs[0], len(prs)
    rems = [p.remaining_steps for p in prs]
    act = {k: sum(p.act_bytes[k] for p in prs) for k in lead.act_bytes}
    if b == 1:
        return GroupCost(lead.step_s, lead.encode_s, lead.decode_s, act, rems[0], rems[0])
    if _same_shape_batch(prs):
        return GroupCost(lead.batch_step_s[b], lead.batch_encode_s[b], lead.batch_decode_s[b], act, rems[0],
                         rems[0])
    if not lead.csp_key or any(p.csp_key != lead.csp_key for p in prs) or b > csp.MAX_BATCH:
        return None
    by_key = {p.batch_key: p for p in prs}
    if len(by_key) == 1 and b > lead.max_batch:
        return None  # one shape past its batch limit: not a CSP batch, and no batched time for it
    enc = _stage_s(prs, "encode")
    dec = _stage_s(prs, "decode")
    if len(by_key) == 1:  # one shape at several step positions: the cost model's batched step
        step = lead.batch_step_s[b]
    else:
        coef = problem.csp[lead.csp_key]
        patches = [p.patches for p in prs]
        step = {k: csp.predict(coef[k], patches, len(by_key)) for k in lead.step_s}
    return GroupCost(step, enc, dec, act, max(rems), min(rems))


def _alts(members: Sequence[_Member], problem: RoundProblem, gpus: Sequence[int],
          mem: dict[int, int], release: int, reserved: Mapping[int, str] = {}, min_efficiency: float = 0.0
          ) -> list[Alt]:
    """On-time alternatives of a job whose members share one state (one request, or a batch)."""
    lead_pr = members[0].pr
    b = len(members)
    deadline = min(m.pr.deadline for m in members)
    stage = lead_pr.stage
    gc = group_cost([m.pr for m in members], problem)
    if gc is None:
        return []
    enc, dec = gc.enc, gc.dec
    out: list[Alt] = []
    model = lead_pr.model
    if stage is Stage.DECODE:
        for g in gpus:
            if not _may_decode(g, lead_pr, reserved):
                continue
            loads, load_s, evicts = load_plan(problem, (g,), model, stage, 0, mem)
            if loads is None:
                continue
            # Decoding away from the diffuse block first moves the latent there.
            move = 0.0 if g in lead_pr.latent_gpus else lead_pr.move_s[problem.node_of[g]]
            latest = ticks_down(deadline - load_s - move - dec)
            if latest >= release:
                span = ticks_up(load_s + move + dec)
                out.append(Alt((g,), 0, 0, span, latest, span, False, 0.0, move, loads, load_s, evicts))
        return out
    step = gc.step
    node_of = problem.node_of
    allowed = [g for g in gpus if reserved.get(g, model) == model]
    own = {g for m in members if has_latent(m.pr) for g in m.pr.latent_gpus}
    encoders = _encoders(problem, gpus, model, reserved) if stage is Stage.ENCODE else {}
    degrees = efficient_degrees(step, min_efficiency)
    if degrees != kept_degrees(step) and not any(
            ticks_down(deadline - sum(chain_parts(stage, enc, 0.0, gc.rem, step[k], dec))) >= release
            for k in degrees):
        degrees = kept_degrees(step)  # only a wide block can still make the deadline: it stays offered
    for k in degrees:
        need = gc.act[k] + b  # per GPU
        if encoders:  # encode apart: the block needs no text encoders
            for blk, ld in _candidate_blocks(problem, gpus, k, model, Stage.DIFFUSE, need, mem, allowed, own):
                e = encoders.get(node_of[blk[0]])
                if e is not None and e not in blk and (ld[0] or not problem.gpu_of[blk[0]].holds(model, "text")):
                    alt = _apart_alt(blk, e, ld, enc, lead_pr.embed_s, gc.rem, step[k], dec, deadline, release)
                    if alt is not None:
                        out.append(alt)
        for blk, (loads, load_s, evicts) in _candidate_blocks(problem, gpus, k, model, stage, need, mem,
                                                                  allowed, own):
            move, migrate = 0.0, False
            for m in members:
                if has_latent(m.pr) and set(m.pr.latent_gpus) != set(blk):
                    move = max(move, m.pr.move_s[node_of[blk[0]]])
                    migrate = True
                elif m.pr.stage is Stage.DIFFUSE and m.pr.latent_gpus and not set(m.pr.latent_gpus) & set(blk):
                    move = max(move, m.pr.embed_s)  # encoded apart: the embeddings come over first
            e, d, dd = chain_parts(stage, enc, move, gc.rem, step[k], dec)
            latest = ticks_down(deadline - (load_s + e + d + dd))
            if latest < release:
                continue
            if loads:  # the whole block waits for the loads
                lead, diff, span = 0, ticks_up(load_s + e + d), ticks_up(load_s + e + d + dd)
            else:
                lead = ticks_down(e) if e else 0
                diff = ticks_up(e + d) - lead
                span = ticks_up(e + d + dd)
            out.append(Alt(blk, lead, diff, span, latest, span + (k - 1) * diff, migrate, step[k], move,
                           loads, load_s, evicts))
    return out


def _encoders(problem: RoundProblem, gpus: Sequence[int], model: str,
              reserved: Mapping[int, str]) -> dict[int, int]:
    """Node -> the GPU of the scope that would encode ``model`` apart (it holds the text encoders):
    the earliest free, then the lowest index."""
    out: dict[int, tuple[float, int]] = {}
    for g in gpus:
        info = problem.gpu_of[g]
        if info.holds(model, "text") and reserved.get(g, model) == model:
            key = (info.free_in, g)
            if info.node not in out or key < out[info.node]:
                out[info.node] = key
    return {n: g for n, (_, g) in out.items()}


def _apart_alt(blk: tuple[int, ...], e: int, ld: "_Loads", enc: float, embed_s: float, rem: int, step: float,
               dec: float, deadline: float, release: int) -> Alt | None:
    """The chain with its encode on ``e`` and the rest on ``blk`` (loads there run meanwhile)."""
    loads, load_s, evicts = ld
    d = embed_s + rem * step
    pre = max(load_s, enc)  # the block starts when its loads and the encode are both done
    latest = ticks_down(deadline - (pre + d + dec))
    if latest < release:
        return None
    lead = 0 if loads else ticks_down(pre)  # a loading block is held from the start
    diff = ticks_up(pre + d) - lead
    span = ticks_up(pre + d + dec)
    n_enc = ticks_up(enc)
    gpu_ms = n_enc + (span - lead) + (len(blk) - 1) * diff
    return Alt(blk, lead, diff, span, latest, gpu_ms, False, step, embed_s, loads, load_s, evicts, e, n_enc)


def chain_components(stage: Stage, first: bool) -> tuple[str, ...]:
    """Components a GPU of the chain's block needs: all of them the backbone; ``block[0]`` also
    the VAE (it decodes) and the text encoders if the request still has to encode."""
    if stage is Stage.DECODE:
        return ("vae",)
    if not first:
        return ("backbone",)
    return ("text", "backbone", "vae") if stage is Stage.ENCODE else ("backbone", "vae")


def weight_bytes(weight: str) -> int:
    model, component = weight.split("/")
    return get_model(model).component_bytes(component)


MAX_LOADING_BLOCKS = 2  # per degree: loading alternatives beyond these are dominated in practice


def _candidate_blocks(problem: RoundProblem, gpus: Sequence[int], k: int, model: str, stage: Stage, need: int,
                      mem: dict[int, int], allowed: Sequence[int] | None = None, own: set[int] = frozenset()
                      ) -> list[tuple[tuple[int, ...], "_Loads"]]:
    """Blocks of ``k`` a chain may use: every block that holds its weights, and the
    :data:`MAX_LOADING_BLOCKS` loading ones with the fewest loading GPUs, then the earliest free.

    ``allowed``: the GPUs not reserved for other models; ``own``: the latent's block, usable anyway."""
    ready, loading = [], []
    info = problem.gpu_of
    blocks = aligned_blocks(gpus if allowed is None else allowed, problem.nodes, k)
    if own and len(own) == k and tuple(sorted(own)) not in blocks and own <= set(gpus):
        blocks.append(tuple(sorted(own)))
    for blk in blocks:
        ld = load_plan(problem, blk, model, stage, need, mem)
        if ld[0] is None:
            continue
        if ld[0]:
            n_load = len({g for g, _ in ld[0]})
            loading.append(((n_load, max(info[g].free_in for g in blk), ld[1], blk), blk, ld))
        else:
            ready.append((blk, ld))
    loading.sort(key=lambda x: x[0])
    return ready + [(blk, ld) for _, blk, ld in loading[:MAX_LOADING_BLOCKS]]


_Loads = tuple[tuple[tuple[int, str], ...] | None, float, tuple[tuple[int, str], ...]]


def load_plan(problem: RoundProblem, blk: tuple[int, ...], model: str, stage: Stage, need: int,
           mem: dict[int, int]) -> _Loads:
    """(loads a chain on ``blk`` needs first, their seconds, evictions), or ``loads`` None when it cannot fit.

    A GPU that lacks a component may evict the other models' weights it holds,
    never latents: the most replicated first (the least missed), then the
    largest, until the new weights and the activations (``need``) fit.
    """
    loads: list[tuple[int, str]] = []
    evicts: list[tuple[int, str]] = []
    longest = 0.0
    gpus = problem.gpu_of
    for i, g in enumerate(blk):
        info = gpus[g]
        missing = [c for c in chain_components(stage, i == 0) if not info.holds(model, c)]
        if not missing:
            if mem[g] < need:
                return None, 0.0, ()
            continue
        if info.load_bw <= 0:
            return None, 0.0, ()
        add = sum(get_model(model).component_bytes(c) for c in missing)
        free = mem[g] - add
        others = sorted((w for w in info.weights if not w.startswith(model + "/")),
                        key=lambda w: (-problem.holders[w], -weight_bytes(w), w))
        for w in others:
            if free >= need:
                break
            free += weight_bytes(w)
            evicts.append((g, w))
        if free < need:
            return None, 0.0, ()
        loads += [(g, c) for c in missing]
        longest = max(longest, add / info.load_bw)
    return tuple(loads), longest, tuple(evicts)


def _batch_chunks(members: Sequence[_Member], max_jobs_left: int) -> list[list[_Member]]:
    """Requests in one state (same batch key, stage, progress, latent) chunked into batches.

    Deadline order, chunks of the batch limit; a final chunk of one is no batch.
    """
    out = []
    mb = members[0].pr.max_batch
    ordered = sorted(members, key=lambda m: (m.pr.deadline, m.pr.id))
    for s in range(0, len(ordered), mb):
        chunk = ordered[s:s + mb]
        if len(chunk) >= 2:
            out.append(chunk)
    return out[:max(0, max_jobs_left)]


def _state_key(m: _Member) -> tuple:
    pr = m.pr
    return (pr.batch_key, pr.stage, pr.steps_done, tuple(pr.latent_gpus) if has_latent(pr) else (),
            m.in_flight, ticks_up(pr.ready_in))


def _csp_state_key(m: _Member) -> tuple:
    """Members that may share a CSP batch: one model, one next stage, one place (where the latent, or the
    prompt embeddings of a request encoded but not yet diffusing, live: so a request encoded on a GPU joins
    the batch running there at its next step boundary), any size or progress."""
    pr = m.pr
    return (pr.csp_key, pr.stage, tuple(pr.latent_gpus), m.in_flight, ticks_up(pr.ready_in))


CSP_SIZES = (2, 3, 4, 6, 8, 12)  # batch sizes offered along each greedy growth (and its final size)


def _fastest_finish(prs: Sequence[ProblemRequest], problem: RoundProblem, free: Sequence[int],
                    min_efficiency: float = 0.0) -> float:
    """Seconds from now the chain of ``prs`` ends at its best degree, started when that many GPUs of the
    scope are first free (no latent move, no loads): the growth test of :func:`_csp_batches`."""
    gc = group_cost(prs, problem)
    if gc is None:
        return math.inf
    stage, ready = prs[0].stage, max(p.ready_in for p in prs)
    best = math.inf
    for k in efficient_degrees(gc.step, min_efficiency):
        step = gc.step[k]
        if k <= len(free):
            e, d, dd = chain_parts(stage, gc.enc, 0.0, gc.rem, step, gc.dec)
            best = min(best, max(ready, free[k - 1] * TICK_S) + e + d + dd)
    return best


def _csp_batches(members: Sequence[_Member], problem: RoundProblem, free: Sequence[int], seeds: int,
                 min_efficiency: float = 0.0) -> list[list[_Member]]:
    """CSP batch candidates of one group, grown greedily as PatchedServe grows its batches: from each of
    the ``seeds`` most urgent members, add the others in deadline order while every member still
    finishes by its deadline (the batch's earliest) at the best degree; offer the sizes of
    :data:`CSP_SIZES` along the way and the final one. Only batches that mix sizes or progress (the
    others are same-shape batches, offered already)."""
    ordered = sorted(members, key=lambda m: (m.pr.deadline, m.pr.id))
    out: list[list[_Member]] = []
    for seed in ordered[:seeds]:
        batch = [seed]
        for m in ordered:
            if m is seed or len(batch) >= csp.MAX_BATCH:
                continue
            trial = [*batch, m]
            if _fastest_finish([x.pr for x in trial], problem, free, min_efficiency) <= \
                    min(x.pr.deadline for x in trial) + 1e-9:
                batch = trial
                if len(batch) in CSP_SIZES:
                    out.append(batch)
        if len(batch) >= 2 and len(batch) not in CSP_SIZES:
            out.append(batch)
    return [b for b in out if not _same_shape_batch([m.pr for m in b])]


def build_schedule(problem: RoundProblem, requests: Iterable[ProblemRequest] | None = None,
                   gpus: Sequence[int] | None = None, params: ScheduleParams = ScheduleParams(),
                   reserved: Mapping[int, str] = {}) -> ScheduleData:
    """The schedule data of ``requests`` on ``gpus`` (default: the whole problem).

    Requests in no job (they cannot be on time on these GPUs, or are beyond
    ``max_jobs``) are left to best effort. ``reserved``: GPU -> the only model
    that may start work there (``planner/solvers/reserve.py``).
    """
    gpus = tuple(g.index for g in problem.gpus) if gpus is None else tuple(gpus)
    gpu_info = {g.index: g for g in problem.gpus}
    mem = {g: gpu_info[g].memory_free for g in gpus}
    busy = {g: ticks_up(gpu_info[g].free_in) for g in gpus}
    waiting_ids = {r.id for r in problem.requests}
    if requests is None:
        requests = (*problem.requests, *problem.in_flight)
    members = [_Member(pr, pr.was_running, pr.id not in waiting_ids) for pr in requests]
    # In-flight work first (it holds capacity), then the waiting requests by deadline.
    members.sort(key=lambda m: (not m.in_flight, m.pr.deadline, m.pr.id))
    jobs: list[Job] = []
    horizon = max(busy.values(), default=0)

    def add(group: Sequence[_Member]) -> bool:
        nonlocal horizon
        release = max(ticks_up(m.pr.ready_in) for m in group)
        alts = _alts(group, problem, gpus, mem, release, reserved, params.min_efficiency)
        if not alts:
            return False
        rems = [m.pr.remaining_steps for m in group]
        jobs.append(Job(len(jobs), tuple(m.pr.id for m in group), group[0].pr.stage, max(rems),
                        release, min(m.pr.deadline for m in group), tuple(alts), sum(m.running for m in group),
                        any(m.in_flight for m in group), min(rems)))
        horizon = max(horizon, max(a.latest + a.span for a in alts))
        return True

    modeled: list[_Member] = []
    waiting = 0
    for m in members:
        if (m.in_flight or waiting < params.max_jobs) and add([m]):
            modeled.append(m)
            waiting += not m.in_flight
    if params.batching:
        groups: dict[tuple, list[_Member]] = {}
        for m in modeled:
            if m.pr.stage is not Stage.DECODE and m.pr.max_batch > 1:
                groups.setdefault(_state_key(m), []).append(m)
        for key in sorted(groups, key=lambda k: min((m.pr.deadline, m.pr.id) for m in groups[k])):
            if len(groups[key]) >= 2:
                for chunk in _batch_chunks(groups[key], params.max_jobs):
                    add(chunk)
    if params.batching and params.csp:
        offered = {j.ids for j in jobs}
        csp_groups: dict[tuple, list[_Member]] = {}
        for m in modeled:
            if m.pr.csp_key and m.pr.stage is not Stage.DECODE:
                csp_groups.setdefault(_csp_state_key(m), []).append(m)
        free = sorted(busy.values())
        for key in sorted(csp_groups, key=lambda k: min((m.pr.deadline, m.pr.id) for m in csp_groups[k])):
            for batch in _csp_batches(csp_groups[key], problem, free, params.csp_seeds, params.min_efficiency):
                ids = tuple(m.pr.id for m in batch)
                if ids not in offered:
                    offered.add(ids)
                    add(batch)
    by_member: dict[str, list[int]] = {}
    for j in jobs:
        for rid in j.ids:
            by_member.setdefault(rid, []).append(j.index)
    return ScheduleData(gpus, busy, tuple(jobs), {r: tuple(v) for r, v in by_member.items()},
                        params.weights, horizon)
