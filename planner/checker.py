"""Independent plan checker.

It re-derives legality from the catalog, the cluster and the requests alone,
so a plan (or a whole timeline written by any executor) can be validated
without trusting the planner that made it.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from models.catalog import get_model
from planner.cluster import Cluster
from planner.plan import RoundPlan
from planner.request import Request, Stage
from planner.state import PlannerState

TOL = 1e-6
ROUNDING = 2e-6  # timeline times carry 6 decimals


def check_plan(state: PlannerState, plan: RoundPlan) -> list[str]:
    """Problems with ``plan`` in ``state``; empty when the plan is legal."""
    problems: list[str] = []
    by_id = {r.id: r for r in state.requests}
    used_gpus: set[int] = set()
    used_reqs: set[str] = set()
    resident = state.resident_bytes()
    weights = state.weight_bytes()
    for rid, reason in plan.rejections:
        st = by_id.get(rid)
        if st is None:
            problems.append(f"rejection of {rid!r}: not a live request")
        elif st.in_flight:
            problems.append(f"rejection of {rid!r}: it has work in flight")
        elif not reason:
            problems.append(f"rejection of {rid!r}: no reason given")
        if rid in used_reqs:
            problems.append(f"rejection of {rid!r}: rejected twice")
        used_reqs.add(rid)
    for i, a in enumerate(plan.assignments):
        tag = f"assignment {i} ({a.stage.value} {list(a.request_ids)} on {list(a.gpus)})"
        if not a.request_ids:
            problems.append(f"{tag}: no requests")
            continue
        if not state.cluster.is_block(tuple(a.gpus)):
            problems.append(f"{tag}: GPUs are not an aligned block of 1/2/4/8 inside one node")
        for g in a.gpus:
            if g in used_gpus:
                problems.append(f"{tag}: GPU {g} used twice")
            elif not 0 <= g < state.cluster.size or state.gpu_free_at[g] > state.now + TOL:
                problems.append(f"{tag}: GPU {g} is busy or does not exist")
            used_gpus.add(g)
        members = []
        for rid in a.request_ids:
            st = by_id.get(rid)
            if st is None:
                problems.append(f"{tag}: request {rid!r} is not live")
                continue
            if rid in used_reqs:
                problems.append(f"{tag}: request {rid!r} assigned twice")
            used_reqs.add(rid)
            if st.in_flight:
                problems.append(f"{tag}: request {rid!r} already has work in flight")
            if st.next_stage is not a.stage:
                problems.append(f"{tag}: request {rid!r} needs {st.next_stage and st.next_stage.value}, not {a.stage.value}")
            if a.stage is Stage.DIFFUSE and not 1 <= a.steps <= st.remaining_steps:
                problems.append(f"{tag}: {a.steps} steps but request {rid!r} has {st.remaining_steps} left")
            members.append(st)
        if not members:
            continue
        if len({m.request.batch_key() for m in members}) > 1:
            problems.append(f"{tag}: batch mixes incompatible requests")
        lead = members[0].request
        spec = get_model(lead.model)
        if a.stage is Stage.DIFFUSE and not spec.legal_sp(len(a.gpus)):
            problems.append(f"{tag}: SP degree {len(a.gpus)} is illegal for {lead.model}")
        if a.stage is not Stage.DIFFUSE and a.steps != 0:
            problems.append(f"{tag}: {a.stage.value} must have steps = 0")
        if a.stage is Stage.DIFFUSE:
            act = spec.activation_bytes(lead.shape, len(a.gpus), len(members))
            for g in a.gpus:
                if g < state.cluster.size and weights + resident[g] + act > state.cluster.gpus[g].memory:
                    problems.append(f"{tag}: GPU {g} memory {weights + resident[g] + act} B exceeds "
                                    f"{state.cluster.gpus[g].memory} B")
    return problems


def check_timeline(requests: Sequence[Request], cluster: Cluster, segments: Iterable[Mapping],
                   outcomes: Mapping[str, Mapping] | None = None) -> list[str]:
    """Problems with a DESIGN 3.3 timeline (segment dicts) for ``requests`` on ``cluster``.

    ``outcomes`` (request id -> the timeline's request record) is checked too:
    finish must be the end of the decode segment and ``met`` must agree with
    the deadline.
    """
    problems: list[str] = []
    by_id = {r.id: r for r in requests}
    per_gpu: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    per_req: dict[str, list[Mapping]] = defaultdict(list)
    for i, seg in enumerate(segments):
        tag = f"segment {i}"
        gpus = tuple(seg["gpus"])
        if seg["end"] < seg["start"] - TOL:
            problems.append(f"{tag}: ends before it starts")
        if seg["sp"] != len(gpus):
            problems.append(f"{tag}: sp {seg['sp']} != {len(gpus)} GPUs")
        if not cluster.is_block(gpus):
            problems.append(f"{tag}: GPUs {list(gpus)} are not an aligned block inside one node")
        stage = seg["stage"]
        if stage not in ("encode", "diffuse", "decode"):
            problems.append(f"{tag}: unknown stage {stage!r}")
        reqs = [by_id.get(rid) for rid in seg["request_ids"]]
        if any(r is None for r in reqs) or not reqs:
            problems.append(f"{tag}: unknown or missing request ids {seg['request_ids']}")
            continue
        if len({r.batch_key() for r in reqs}) > 1:
            problems.append(f"{tag}: batch mixes incompatible requests")
        if stage == "diffuse":
            if seg["steps"] < 1:
                problems.append(f"{tag}: diffuse with {seg['steps']} steps")
            if not get_model(reqs[0].model).legal_sp(len(gpus)):
                problems.append(f"{tag}: SP degree {len(gpus)} illegal for {reqs[0].model}")
        elif seg["steps"] != 0:
            problems.append(f"{tag}: {stage} must have steps = 0")
        for g in gpus:
            per_gpu[g].append((seg["start"], seg["end"], tag))
        for r in reqs:
            if seg["start"] < r.arrival - TOL:
                problems.append(f"{tag}: starts before request {r.id!r} arrives")
            per_req[r.id].append(seg)
    for g, spans in per_gpu.items():
        spans.sort()
        for (s0, e0, t0), (s1, e1, t1) in zip(spans, spans[1:]):
            if s1 < e0 - TOL:
                problems.append(f"GPU {g}: {t0} and {t1} overlap")
    order = {"encode": 0, "diffuse": 1, "decode": 2}
    for rid, segs in per_req.items():
        r = by_id[rid]
        segs = sorted(segs, key=lambda s: (s["start"], order.get(s["stage"], 3)))
        stages = [s["stage"] for s in segs]
        if stages != sorted(stages, key=lambda x: order.get(x, 3)):
            problems.append(f"request {rid!r}: stages out of order {stages}")
        if stages.count("encode") > 1 or stages.count("decode") > 1:
            problems.append(f"request {rid!r}: encode or decode ran twice")
        for a, b in zip(segs, segs[1:]):
            if b["start"] < a["end"] - TOL:
                problems.append(f"request {rid!r}: segments overlap in time")
        steps = sum(s["steps"] for s in segs if s["stage"] == "diffuse")
        done = "decode" in stages
        if steps > r.steps or (done and steps != r.steps):
            problems.append(f"request {rid!r}: ran {steps} diffuse steps of {r.steps}")
    if outcomes is not None:
        for r in requests:
            rec = outcomes.get(r.id)
            if rec is None:
                problems.append(f"request {r.id!r}: no request record")
                continue
            decodes = [s for s in per_req.get(r.id, []) if s["stage"] == "decode"]
            finish = rec.get("finish")
            if decodes and (finish is None or abs(finish - decodes[0]["end"]) > 1e-3):
                problems.append(f"request {r.id!r}: finish {finish} != decode end {decodes[0]['end']}")
            if not decodes and finish is not None:
                problems.append(f"request {r.id!r}: finish {finish} without a decode segment")
            # Timelines round times to 1e-6 s: within that of the deadline either verdict is right.
            late = finish is None or finish > r.deadline + ROUNDING
            early = finish is not None and finish < r.deadline - ROUNDING
            if (bool(rec.get("met")) and late) or (not rec.get("met") and early):
                problems.append(f"request {r.id!r}: met={rec.get('met')} but finish {finish} vs deadline {r.deadline}")
    return problems
