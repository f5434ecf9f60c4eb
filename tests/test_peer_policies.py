"""Behaviour of the peer-system policies: ``genserve`` (GenServe) and ``hetu-ilp`` (TridentServe / Hetu-DiT)."""
from __future__ import annotations

import random

import pytest

from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.planner.checker import check_plan, check_timeline
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.metrics import timeline_records
from ditplan.planner.policies import Policy, make_policy, policy_names
from ditplan.planner.policies.hetu_ilp import SOLVE_INTERVAL_S, efficient_degrees
from ditplan.planner.policies.kit.packing import packing_fits
from ditplan.planner.policies.kit.timing import TimingTable
from ditplan.planner.request import Request, RequestState, RequestStatus, Stage
from ditplan.planner.simulator import SimConfig, Simulator
from ditplan.planner.state import PlannerState

COST = CostModel("H100")
CLUSTER = parse_cluster("8xH100")
PEERS = ("genserve", "hetu-ilp")
COG = dict(model="cogvideox-5b", width=720, height=480, frames=49, steps=50)


def req(rid, arrival=0.0, model="flux-dev", size=1024, frames=1, steps=10, deadline=1e6, width=None, height=None):
    return Request(rid, model, Shape(height or size, width or size, frames), steps, arrival, deadline)


def status(r: Request, *, steps_done=0, latent=(), encoded=None, state=None) -> RequestStatus:
    if state is None:
        state = RequestState.PAUSED if (steps_done or encoded) else RequestState.QUEUED
    return RequestStatus(r, state=state, encoded=bool(encoded or steps_done), steps_done=steps_done,
                         latent_gpus=tuple(latent), sp=len(latent) if steps_done else 0)


def planner_state(statuses, now=10.0, busy=(), just_paused=(), cluster=CLUSTER):
    free_at = [now + 5.0 if g in set(busy) else now for g in range(cluster.size)]
    served = tuple(sorted({s.request.model for s in statuses}))
    return PlannerState(now, cluster, COST, list(statuses), free_at, served, 2.0, frozenset(just_paused))


class Checked(Policy):
    """Wraps a policy: every plan must pass the independent checker; keeps (state summary, plan)."""

    def __init__(self, name):
        self.policy = make_policy(name)
        self.name = self.policy.name
        self.log = []

    def reset(self):
        self.policy.reset()

    def plan(self, state):
        plan = self.policy.plan(state)
        assert check_plan(state, plan) == [], (state.now, plan)
        self.log.append((state.now, plan))
        return plan


def simulate(name, requests, cluster=CLUSTER, **cfg):
    pol = Checked(name)
    res = Simulator(cluster, COST, pol, SimConfig(**cfg)).run(requests)
    recs = timeline_records(res)
    segs = [r for r in recs if r["type"] == "segment"]
    outcomes = {r["id"]: r for r in recs if r["type"] == "request"}
    assert check_timeline(requests, cluster, segs, outcomes) == []
    return res, pol


def segments_of(res, rid, stage=None):
    return [s for s in res.segments if rid in s.request_ids and (stage is None or s.stage is stage)]


def test_peer_policies_are_registered():
    assert set(PEERS) <= set(policy_names())
    for name in PEERS:
        assert make_policy(name).name == name


def test_packing_counts_are_exact_for_buddy_blocks():
    caps = {1: 3, 2: 1, 4: 0, 8: 0}  # free GPUs {0, 1, 3}: one free pair
    assert packing_fits({2: 1, 1: 1}, caps)
    assert not packing_fits({2: 2}, caps)
    assert not packing_fits({1: 4}, caps)
    assert not packing_fits({4: 1}, caps)


# --- genserve ----------------------------------------------------------------------
def test_genserve_batches_same_shape_images_into_one_assignment():
    same = [req(f"s{i}", model="sd3-medium", size=512, steps=28, deadline=30.0) for i in range(4)]
    other = req("o", model="sd3-medium", size=768, steps=28, deadline=30.0)
    assert COST.max_batch(get_model("sd3-medium"), same[0].shape) == 4
    plan = make_policy("genserve").plan(planner_state([status(r) for r in same + [other]], now=0.0))
    enc = {a.request_ids for a in plan.assignments if a.stage is Stage.ENCODE}
    assert ("s0", "s1", "s2", "s3") in enc and ("o",) in enc
    # Through the simulator the batch stays one forward pass per stage and all meet their deadline.
    res, _ = simulate("genserve", same + [other])
    for stage in Stage:
        assert {s.request_ids for s in segments_of(res, "s0", stage)} == {("s0", "s1", "s2", "s3")}
    assert all(s.finish <= s.request.deadline for s in res.requests)


def test_genserve_does_not_batch_when_batching_would_make_an_image_late():
    # Tight deadlines: 4 images of 28 steps at batch 4 take 28 x 0.13 s at k=1, too slow; alone each fits.
    tight = [req(f"t{i}", model="sd3-medium", size=1024, steps=28, deadline=1.9) for i in range(4)]
    plan = make_policy("genserve").plan(planner_state([status(r) for r in tight], now=0.0))
    assert all(len(a.request_ids) < 4 for a in plan.assignments)


@pytest.mark.parametrize("loose", ["v1", "v2"])
def test_genserve_pauses_the_video_with_the_most_slack_and_resumes_it(loose):
    # Two CogVideoX videos need SP 4 to be on time (k=2: 50 x 0.478 s + 1.47 s decode > 22 s), so they
    # run side by side on (0-3) and (4-7) with aligned step boundaries. A FLUX 2048 image arriving at
    # t=1 needs a 4-GPU block to make its 2.2 s deadline: at the boundary one video must be paused.
    tight = "v2" if loose == "v1" else "v1"
    deadlines = {loose: 22.0, tight: 19.0}
    videos = [req(v, **COG, deadline=deadlines[v]) for v in ("v1", "v2")]
    image = req("img", arrival=1.0, size=2048, steps=6, deadline=3.2)
    res, pol = simulate("genserve", videos + [image])
    st = {s.id: s for s in res.requests}
    assert st[loose].preemptions == 1 and st[tight].preemptions == 0
    paused_at = [(t, p.stats.paused) for t, p in pol.log if p.stats.paused]
    assert [ids for _, ids in paused_at] == [[loose]]
    t_pause = paused_at[0][0]
    # The image takes the paused video's 4-GPU block at that boundary and meets its deadline.
    img_diffuse = segments_of(res, "img", Stage.DIFFUSE)
    assert len(img_diffuse) == 1 and img_diffuse[0].sp == 4
    assert set(img_diffuse[0].gpus) == set(segments_of(res, loose, Stage.DIFFUSE)[0].gpus)
    assert st["img"].finish <= image.deadline
    # The paused video resumes after the image and still meets its deadline; the other never stopped.
    resumed = [s for s in segments_of(res, loose, Stage.DIFFUSE) if s.start > t_pause]
    assert resumed and resumed[0].start >= img_diffuse[0].start
    assert all(st[v].finish <= st[v].request.deadline for v in ("v1", "v2"))
    tight_segs = segments_of(res, tight, Stage.DIFFUSE)
    assert all(b.start == pytest.approx(a.end) for a, b in zip(tight_segs, tight_segs[1:]))


def test_genserve_pauses_no_video_when_images_fit_on_free_gpus():
    video = status(req("v", **COG, deadline=40.0), steps_done=12, latent=(0, 1, 2, 3))
    image = status(req("i", size=1024, steps=10, deadline=11.5))
    plan = make_policy("genserve").plan(planner_state([video, image], just_paused={"v"}))
    ids = {rid for a in plan.assignments for rid in a.request_ids}
    assert ids == {"v", "i"} and plan.stats.paused == []


def test_genserve_elastic_sp_raises_the_degree_of_a_video_that_fell_behind():
    # Paused at k=2 with 30 steps left; only k>=4 still meets the deadline: it resumes on a 4-block
    # that contains its latent.
    cog = get_model("cogvideox-5b")
    r = req("v", **COG, deadline=0.0)
    t2, t4 = (COST.step_time(cog, r.shape, k) for k in (2, 4))
    now, dec = 10.0, COST.decode_time(cog, r.shape)
    budget = 30 * (t2 + t4) / 2  # between 30 x T4 and 30 x T2
    r = req("v", **COG, deadline=now + dec + budget)
    st = status(r, steps_done=20, latent=(2, 3))
    for just in ((), ("v",)):  # paused earlier, or at its step boundary right now
        plan = make_policy("genserve").plan(planner_state([st], now=now, just_paused=just))
        (a,) = plan.assignments
        assert a.stage is Stage.DIFFUSE and a.sp == 4 and set(st.latent_gpus) <= set(a.gpus)


def mixed_trace(seed, n=40):
    """Videos and small bursts of same-shape images, arriving about 0.8 per second."""
    rng = random.Random(seed)
    reqs = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(0.8)
        if rng.random() < 0.3:
            reqs.append(req(f"r{i}", arrival=t, **{**COG, "frames": rng.choice([17, 33, 49])},
                            deadline=t + rng.uniform(15, 40)))
        else:  # images come in small bursts of one shape
            size = rng.choice([512, 1024])
            for j in range(rng.choice([1, 3])):
                reqs.append(req(f"r{i}.{j}", arrival=t, model="sd3-medium", size=size, steps=28,
                                deadline=t + rng.uniform(1.5, 5)))
    return reqs


def test_genserve_full_mixed_run_is_legal_and_deterministic():
    reqs = mixed_trace(5)
    a, _ = simulate("genserve", reqs)
    b, _ = simulate("genserve", reqs)
    assert [(s.request_ids, s.gpus, s.start) for s in a.segments] == \
        [(s.request_ids, s.gpus, s.start) for s in b.segments]
    assert all(s.state is RequestState.DONE for s in a.requests)
    assert any(len(s.request_ids) > 1 for s in a.segments)  # some batching happened


# --- hetu-ilp --------------------------------------------------------------------------
def _eff(model, shape, k, batch=1):
    spec = get_model(model)
    t1 = COST.step_time(spec, shape, 1, batch)
    tk = COST.step_time(spec, shape, k, batch, link_bw=CLUSTER.block_bandwidth(CLUSTER.blocks(k)[0]) if k > 1 else None)
    return t1 / tk / k


def test_hetu_degree_follows_parallel_efficiency():
    small = req("small", model="sd3-medium", size=512, steps=28, deadline=100.0)
    big = req("big", arrival=0.0, size=2048, steps=28, deadline=100.0)
    assert _eff("sd3-medium", small.shape, 2) < 0.8  # 0.51 on H100
    assert _eff("flux-dev", big.shape, 4) >= 0.8 > _eff("flux-dev", big.shape, 8)  # 0.93, 0.53
    for r, allowed in ((small, {1}), (big, {2, 4})):
        res, _ = simulate("hetu-ilp", [r])
        (d,) = segments_of(res, r.id, Stage.DIFFUSE)
        assert d.sp in allowed, (r.id, d.sp)
    # On an empty cluster the idle-GPU penalty picks the largest efficient degree.
    res, _ = simulate("hetu-ilp", [big])
    assert segments_of(res, "big", Stage.DIFFUSE)[0].sp == 4


def test_hetu_never_uses_an_inefficient_degree_decodes_on_one_gpu_and_never_preempts():
    rng = random.Random(7)
    shapes = [("sd3-medium", 512), ("sd3-medium", 1024), ("flux-dev", 1024), ("flux-dev", 2048)]
    reqs = []
    t = 0.0
    for i in range(36):
        t += rng.expovariate(2.0)
        if i % 6 == 5:
            reqs.append(req(f"r{i}", arrival=t, **COG, deadline=t + 40))
        else:
            model, size = rng.choice(shapes)
            reqs.append(req(f"r{i}", arrival=t, model=model, size=size, steps=20, deadline=t + rng.uniform(2, 10)))
    res, _ = simulate("hetu-ilp", reqs)
    by_id = {r.id: r for r in reqs}
    for seg in res.segments:
        lead = by_id[seg.request_ids[0]]
        if seg.stage is Stage.DIFFUSE:
            assert seg.sp == 1 or _eff(lead.model, lead.shape, seg.sp, len(seg.request_ids)) >= 0.8 - 1e-9
            assert seg.steps == lead.steps  # one non-preemptive diffuse: all steps at once
        else:
            assert seg.sp == 1
    for st in res.requests:
        assert st.state is RequestState.DONE and st.preemptions == 0 and st.sp_changes == 0
        (d,) = segments_of(res, st.id, Stage.DIFFUSE)
        (dec,) = segments_of(res, st.id, Stage.DECODE)
        (enc,) = segments_of(res, st.id, Stage.ENCODE)
        assert set(dec.gpus) <= set(d.gpus) and set(enc.gpus) <= set(d.gpus)  # stays on its block
    assert any(seg.sp > 1 for seg in res.segments if seg.stage is Stage.DIFFUSE)


def test_hetu_decode_frees_the_rest_of_the_block_for_the_next_task():
    big = req("big", size=2048, steps=6, deadline=100.0)
    nxt = req("next", arrival=0.2, size=2048, steps=6, deadline=100.0)
    res, _ = simulate("hetu-ilp", [big, nxt], cluster=parse_cluster("4xH100"))
    (d1,) = segments_of(res, "big", Stage.DIFFUSE)
    (dec,) = segments_of(res, "big", Stage.DECODE)
    (e2,) = segments_of(res, "next", Stage.ENCODE)
    assert d1.sp == 4 and dec.sp == 1
    # The next task starts on the 3 GPUs freed by the downscaled decode while it is still running
    # (a 2-GPU block: k=4 is busy with the decode), instead of waiting for the decode to end.
    assert dec.start <= e2.start < dec.end
    assert segments_of(res, "next", Stage.DIFFUSE)[0].sp == 2


def test_hetu_resolves_on_its_half_second_cadence():
    a = req("a", size=1024, steps=10, deadline=100.0)
    b = req("b", arrival=0.1, size=1024, steps=10, deadline=100.0)
    res, pol = simulate("hetu-ilp", [a, b])
    assert segments_of(res, "a", Stage.ENCODE)[0].start == 0.0
    # b arrived at 0.1 with idle GPUs, but the last solve was at 0: it waits for the 0.5 s tick.
    assert segments_of(res, "b", Stage.ENCODE)[0].start == pytest.approx(SOLVE_INTERVAL_S)
    solves = [(t, p.stats.trigger) for t, p in pol.log if p.stats.solved]
    assert solves == [(0.0, "interval"), (pytest.approx(0.5), "interval")]
    plan_at_b = next(p for t, p in pol.log if t == pytest.approx(0.1))
    assert plan_at_b.wake_at == pytest.approx(0.5) and not plan_at_b.stats.solved


def test_hetu_resolves_early_when_gpus_free_up():
    one = parse_cluster("1xH100")
    a = req("a", model="sd3-medium", size=512, steps=4, deadline=100.0)
    b = req("b", arrival=0.05, model="sd3-medium", size=512, steps=4, deadline=100.0)
    res, pol = simulate("hetu-ilp", [a, b], cluster=one)
    a_done = res.requests[0].finish
    assert a_done < SOLVE_INTERVAL_S
    assert segments_of(res, "b", Stage.ENCODE)[0].start == pytest.approx(a_done)
    assert [p.stats.trigger for t, p in pol.log if p.stats.solved] == ["interval", "freed"]


def test_hetu_batches_queued_same_shape_images_and_rewards_on_time_requests():
    imgs = [req(f"i{k}", model="sd3-medium", size=512, steps=28, deadline=30.0) for k in range(6)]
    plan = make_policy("hetu-ilp").plan(planner_state([status(r) for r in imgs], now=0.0))
    sizes = sorted(len(a.request_ids) for a in plan.assignments)
    assert sizes == [2, 4] and all(a.sp == 1 and a.stage is Stage.ENCODE for a in plan.assignments)


def test_hetu_efficient_degrees_table():
    times = TimingTable().bind(planner_state([], now=0.0))
    assert efficient_degrees(times.at("sd3-medium", Shape(512, 512))) == (1,)
    assert efficient_degrees(times.at("flux-dev", Shape(2048, 2048))) == (1, 2, 4)
    assert efficient_degrees(times.at("hunyuanvideo", Shape(720, 1280, 129))) == (1, 2, 4, 8)


# --- both: a new run, legality on arbitrary states ------------------------------------------
@pytest.mark.parametrize("name", PEERS)
def test_a_policy_reused_for_a_second_run_plans_it_exactly_as_a_fresh_one(name):
    """What a run leaves behind (genserve's held blocks, hetu-ilp's bound tasks and solve cadence)
    never reaches the next: the simulator resets its policy before each run."""
    first, second = mixed_trace(1, n=30), mixed_trace(2, n=30)
    reused, fresh = Checked(name), Checked(name)
    Simulator(CLUSTER, COST, reused, SimConfig(horizon_s=12.0)).run(first)  # cut mid-run
    n = len(reused.log)
    again = Simulator(CLUSTER, COST, reused).run(second)
    alone = Simulator(CLUSTER, COST, fresh).run(second)
    assert again.segments == alone.segments
    assert [(t, p, p.stats) for t, p in reused.log[n:]] == [(t, p, p.stats) for t, p in fresh.log]


# --- both: legality on arbitrary states ----------------------------------------------------
def _random_state(rng, cluster):
    now = 100.0
    busy = {g for g in range(cluster.size) if rng.random() < 0.4}
    kinds = (("flux-dev", 1024, 1), ("flux-dev", 2048, 1), ("sd3-medium", 512, 1), ("sdxl", 1024, 1),
             ("cogvideox-5b", 480, 49))
    statuses, just = [], set()
    for i in range(rng.randint(0, 12)):
        model, side, frames = rng.choice(kinds)
        r = Request(f"r{i}", model, Shape(side, side if frames == 1 else 720, frames), 28, float(i),
                    now + rng.uniform(-5, 30))
        k = rng.choice(get_model(model).sp_degrees(cluster.max_node_gpus))
        latent = rng.choice(cluster.blocks(k))
        phase = rng.choice(["queued", "encoded", "diffusing", "decode", "inflight"])
        if phase == "queued":
            st = status(r)
        elif phase == "encoded":
            st = status(r, encoded=True, latent=latent[:1])
        elif phase == "diffusing":
            st = status(r, steps_done=rng.randint(1, 27), latent=latent)
            if rng.random() < 0.5 and not set(latent) & busy:
                just.add(r.id)
        elif phase == "decode":
            st = status(r, steps_done=28, latent=latent)
        else:
            st = status(r, steps_done=rng.randint(1, 27), latent=latent, state=RequestState.RUNNING)
            busy |= set(latent)
        statuses.append(st)
    return planner_state(statuses, now=now, busy=busy, just_paused=just, cluster=cluster)


@pytest.mark.parametrize("spec", ["8xH100", "2x4xA40"])
def test_peer_policies_make_legal_plans_on_random_states(spec):
    cluster = parse_cluster(spec)
    rng = random.Random(spec)
    for name in PEERS:
        assigned = 0
        for _ in range(60):
            state = _random_state(rng, cluster)
            plan = make_policy(name).plan(state)
            assert check_plan(state, plan) == [], (name, plan)
            assigned += len(plan.assignments)
        assert assigned > 0, name
