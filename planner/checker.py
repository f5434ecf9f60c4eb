"""Independent plan checker.

It re-derives legality from the catalog, the cluster and the requests alone,
so a plan (or a whole timeline written by any executor) can be validated
without trusting the planner that made it.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from ditplan.models.catalog import COMPONENTS, STAGE_COMPONENT, get_model
from ditplan.planner.cluster import Cluster
from ditplan.planner.placement import Placement
from ditplan.planner.plan import RoundPlan
from ditplan.planner.request import Request, Stage, batch_conflict
from ditplan.planner.state import PlannerState

TOL = 1e-6
ROUNDING = 2e-6  # timeline times carry 6 decimals


def check_plan(state: PlannerState, plan: RoundPlan) -> list[str]:
    """Problems with ``plan`` in ``state``; empty when the plan is legal."""
    problems: list[str] = []
    by_id = {r.id: r for r in state.requests}
    used_gpus: set[int] = set()
    used_reqs: set[str] = set()
    resident = state.resident_bytes()
    placement = state.placement.apply(plan.unloads, plan.loads)
    problems += _check_placement_changes(state, plan, placement, resident, used_gpus)
    weights = placement.weight_bytes_all()
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
        conflict = batch_conflict([m.request for m in members], [m.steps_done for m in members])
        if conflict:
            problems.append(f"{tag}: {conflict}")
        lead = members[0].request
        spec = get_model(lead.model)
        if a.stage is Stage.DIFFUSE and not spec.legal_sp(len(a.gpus)):
            problems.append(f"{tag}: SP degree {len(a.gpus)} is illegal for {lead.model}")
        if a.stage is not Stage.DIFFUSE and a.steps != 0:
            problems.append(f"{tag}: {a.stage.value} must have steps = 0")
        component = STAGE_COMPONENT[a.stage.value]
        for g in a.gpus:
            if 0 <= g < state.cluster.size and not placement.holds(g, lead.model, component):
                problems.append(f"{tag}: GPU {g} does not hold the {component} weights of {lead.model}")
        if a.stage is Stage.DIFFUSE:
            act = sum(spec.activation_bytes(m.request.shape, len(a.gpus)) for m in members)
            for g in a.gpus:
                if g < state.cluster.size and weights[g] + resident[g] + act > state.cluster.gpus[g].memory:
                    problems.append(f"{tag}: GPU {g} memory {weights[g] + resident[g] + act} B exceeds "
                                    f"{state.cluster.gpus[g].memory} B")
    return problems


def _check_placement_changes(state: PlannerState, plan: RoundPlan, after: Placement, resident: list[int],
                             used_gpus: set[int]) -> list[str]:
    """Unloads and loads touch idle GPUs only, change something real, and fit in memory (``after``
    them, with ``resident`` latent bytes per GPU); loading GPUs join ``used_gpus``."""
    problems: list[str] = []
    cluster, before = state.cluster, state.placement
    for kind, actions in (("unload", plan.unloads), ("load", plan.loads)):
        seen = set()
        for w in actions:
            tag = f"{kind} of {w.model} {w.component} on GPU {w.gpu}"
            if w.component not in COMPONENTS:
                problems.append(f"{tag}: unknown component")
                continue
            if not 0 <= w.gpu < cluster.size:
                problems.append(f"{tag}: no such GPU")
                continue
            if state.gpu_free_at[w.gpu] > state.now + TOL:
                problems.append(f"{tag}: the GPU is busy")
            if (w.gpu, w.weight) in seen:
                problems.append(f"{tag}: given twice")
            seen.add((w.gpu, w.weight))
            held = before.holds(w.gpu, w.model, w.component)
            if kind == "unload" and not held:
                problems.append(f"{tag}: not resident")
            if kind == "load" and held and w not in plan.unloads:
                problems.append(f"{tag}: already resident")
    for g in {w.gpu for w in plan.loads if 0 <= w.gpu < cluster.size}:
        need = after.weight_bytes(g) + resident[g]
        if need > cluster.gpus[g].memory:
            problems.append(f"loads on GPU {g}: weights + paused latents {need} B exceed {cluster.gpus[g].memory} B")
        used_gpus.add(g)  # a loading GPU runs nothing else
    return problems


def check_timeline(requests: Sequence[Request], cluster: Cluster, segments: Iterable[Mapping],
                   outcomes: Mapping[str, Mapping] | None = None,
                   weights: Iterable[Mapping] | None = None) -> list[str]:
    """Problems with a timeline (docs/architecture.md, Contracts) (segment dicts) for ``requests`` on ``cluster``.

    ``outcomes`` (request id -> the timeline's request record) is checked too:
    finish must be the end of the decode segment and ``met`` must agree with
    the deadline. ``weights`` (the ``load`` and ``unload`` records, weights
    resident at the start as loads at 0..0) checks placement too: every
    segment runs where its component is loaded, no load overlaps work on its
    GPU, and weights + activations fit in memory.
    """
    segments = list(segments)
    problems: list[str] = []
    if weights is not None:
        problems += _check_weights(requests, cluster, segments, list(weights))
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
        conflict = batch_conflict(reqs)
        if conflict:
            problems.append(f"{tag}: {conflict}")
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


def _check_weights(requests: Sequence[Request], cluster: Cluster, segments: Sequence[Mapping],
                   records: Sequence[Mapping]) -> list[str]:
    problems: list[str] = []
    by_id = {r.id: r for r in requests}
    # Per GPU: [(taken from, usable from, freed at, (model, component))].
    held: dict[int, list[list]] = defaultdict(list)
    for i, rec in enumerate(sorted(records, key=lambda r: (r["start"], r["type"] == "load"))):
        g, w = rec["gpu"], (rec["model"], rec["component"])
        if not 0 <= g < cluster.size or rec["component"] not in COMPONENTS:
            problems.append(f"{rec['type']} record {i}: GPU {g} or component {rec['component']!r} unknown")
            continue
        live = [h for h in held[g] if h[3] == w and h[2] is None]
        if rec["type"] == "load":
            if live:
                problems.append(f"GPU {g}: {w[0]} {w[1]} loaded at {rec['start']} while resident")
                continue
            held[g].append([rec["start"], rec["end"], None, w])
            taken = sum(get_model(h[3][0]).component_bytes(h[3][1]) for h in held[g] if h[2] is None)
            if taken > cluster.gpus[g].memory:
                problems.append(f"GPU {g}: weights {taken} B exceed {cluster.gpus[g].memory} B at {rec['start']}")
        elif not live:
            problems.append(f"GPU {g}: {w[0]} {w[1]} unloaded at {rec['start']} but not resident")
        else:
            live[0][2] = rec["start"]

    def resident(g: int, t0: float, t1: float) -> list[tuple[str, str]]:
        """Weights usable on ``g`` all through [t0, t1]."""
        return [h[3] for h in held[g] if h[1] <= t0 + TOL and (h[2] is None or h[2] >= t1 - TOL)]

    def taken_bytes(g: int, t: float) -> int:
        return sum(get_model(m).component_bytes(c) for s, _, f, (m, c) in held[g] if s <= t + TOL and (f is None or f > t + TOL))

    for i, seg in enumerate(segments):
        reqs = [by_id.get(rid) for rid in seg["request_ids"]]
        if not reqs or any(r is None for r in reqs) or seg["stage"] not in STAGE_COMPONENT:
            continue  # reported by check_timeline
        lead = reqs[0]
        comp = STAGE_COMPONENT[seg["stage"]]
        act = sum(get_model(lead.model).activation_bytes(r.shape, len(seg["gpus"])) for r in reqs) \
            if seg["stage"] == "diffuse" else 0
        for g in seg["gpus"]:
            if not 0 <= g < cluster.size:
                continue
            if (lead.model, comp) not in resident(g, seg["start"], seg["end"]):
                problems.append(f"segment {i}: GPU {g} does not hold the {comp} weights of {lead.model} "
                                f"over [{seg['start']}, {seg['end']}]")
            need = taken_bytes(g, seg["start"]) + act
            if need > cluster.gpus[g].memory:
                problems.append(f"segment {i}: GPU {g} weights + activations {need} B exceed "
                                f"{cluster.gpus[g].memory} B")
            for s, e, _, w in held[g]:
                if e > s + TOL and seg["start"] < e - TOL and s < seg["end"] - TOL:
                    problems.append(f"segment {i}: GPU {g} runs while loading {w[0]} {w[1]} [{s}, {e}]")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ditplan.planner.checker TRACE TIMELINE --cluster C``: 0 legal, 1 with the problems, 2 bad input.

    The requests (and their deadlines, at ``--slo-scale`` as ``ditplan whatif``
    gives them) come from the trace, not from the timeline, so the timeline's
    own deadlines are checked too.
    """
    import argparse
    import sys

    from ditplan.models.cost import CostModel
    from ditplan.planner.cluster import parse_cluster
    from ditplan.planner.errors import InputError
    from ditplan.planner.metrics import read_timeline
    from ditplan.planner.traces import read_trace
    from ditplan.planner.whatif import to_requests

    ap = argparse.ArgumentParser(prog="python -m ditplan.planner.checker",
                                 description="Check a timeline (ditplan whatif --timeline) against its trace.")
    ap.add_argument("trace", help="the trace the timeline ran (JSON Lines or Hetu-DiT lines)")
    ap.add_argument("timeline", help="the timeline (JSON Lines of load, unload, segment and request records)")
    ap.add_argument("--cluster", default="8xH100", help="the cluster it ran on (NxKIND, MxNxKIND or a JSON file)")
    ap.add_argument("--slo-scale", type=float, default=1.5, help="deadline scale of requests without a deadline")
    args = ap.parse_args(argv)
    try:
        cluster = parse_cluster(args.cluster)
        requests = to_requests(read_trace(args.trace), CostModel(cluster.kind), cluster, args.slo_scale)
        segments, outcomes, weights = read_timeline(args.timeline)
    except (InputError, OSError, ValueError, KeyError) as exc:
        print(f"python -m ditplan.planner.checker: {str(exc).strip(chr(34))}", file=sys.stderr)
        return 2
    problems = check_timeline(requests, cluster, segments, outcomes, weights or None)
    for r in requests:
        got = outcomes.get(r.id, {}).get("deadline")
        if got is not None and abs(got - r.deadline) > ROUNDING + 1e-9 * abs(r.deadline):
            problems.append(f"request {r.id}: the timeline's deadline {got} is not the trace's {r.deadline:.6f} "
                            f"(at --slo-scale {args.slo_scale:g})")
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) in {args.timeline}")
        return 1
    print(f"{args.timeline}: legal ({len(segments)} segments, {len(outcomes)} requests, "
          f"{len(weights)} weight records on {cluster.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
