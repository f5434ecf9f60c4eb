import pytest

from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.planner.checker import check_timeline
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.metrics import summarize, timeline_records
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies import Policy
from ditplan.planner.request import Request, RequestState, Stage
from ditplan.planner.simulator import PlanViolation, SimConfig, Simulator

CLUSTER = parse_cluster("8xH100")
COST = CostModel("H100")


def req(rid, arrival=0.0, model="flux-dev", size=1024, frames=1, steps=10, deadline=1e6):
    return Request(rid, model, Shape(size, size, frames), steps, arrival, deadline)


class Scripted(Policy):
    """Calls ``script(state)`` for the assignments; records every call."""

    name = "scripted"

    def __init__(self, script):
        self.script, self.calls = script, []

    def plan(self, state):
        self.calls.append(state.now)
        out = self.script(state)
        if isinstance(out, RoundPlan):
            return out
        return RoundPlan(tuple(out))


def by_stage(state, rid):
    return next((r for r in state.waiting() if r.id == rid), None)


def test_stages_run_in_order_and_a_move_pays_the_latent_transfer():
    r = req("a", steps=10)
    route = {0: (0,), 1: (0, 1), 2: (2, 3)}

    def script(state):
        st = by_stage(state, "a")
        if st is None:
            return []
        if st.next_stage is Stage.ENCODE:
            return [Assignment(("a",), Stage.ENCODE, (0,))]
        if st.next_stage is Stage.DIFFUSE:
            gpus = route[1] if st.steps_done == 0 else route[2]
            return [Assignment(("a",), Stage.DIFFUSE, gpus, 5)]
        return [Assignment(("a",), Stage.DECODE, (2,))]

    res = Simulator(CLUSTER, COST, Scripted(script)).run([r])
    flux, s = get_model("flux-dev"), r.shape
    enc, dec = COST.encode_time(flux, s), COST.decode_time(flux, s)
    step2 = COST.step_time(flux, s, 2, link_bw=450e9)
    move = COST.transfer_time(flux.latent_bytes(s), 450e9)
    st = res.requests[0]
    assert st.state is RequestState.DONE
    assert st.finish == pytest.approx(enc + 5 * step2 + move + 5 * step2 + dec)
    assert st.migrations == 1 and st.sp_changes == 0 and st.preemptions == 0
    assert [seg.stage for seg in res.segments] == [Stage.ENCODE, Stage.DIFFUSE, Stage.DIFFUSE, Stage.DECODE]
    assert check_timeline([r], CLUSTER, [x for x in timeline_records(res) if x["type"] == "segment"]) == []


def test_pausing_a_video_counts_a_preemption_and_keeps_its_latent_resident():
    video = req("v", model="cogvideox-5b", size=480, frames=49, steps=6)
    image = req("i", arrival=0.5, size=512, steps=4)
    seen = {}

    def script(state):
        out = []
        free = set(state.idle_gpus())
        for st in state.waiting():
            stage = st.next_stage
            if st.id == "v" and stage is Stage.DIFFUSE and state.now > 0.5 and "i" in {r.id for r in state.requests} \
                    and next(r for r in state.requests if r.id == "i").state is not RequestState.DONE:
                seen["resident"] = state.resident_bytes()[0]
                continue  # the image goes first: pause the video
            base = 0 if st.id == "v" else 4
            gpus = tuple(range(base, base + 4)) if stage is Stage.DIFFUSE else (base,)
            if not set(gpus) <= free:
                continue
            free -= set(gpus)
            steps = min(2, st.remaining_steps) if stage is Stage.DIFFUSE else 0
            out.append(Assignment((st.id,), stage, gpus, steps))
        return out

    res = Simulator(CLUSTER, COST, Scripted(script)).run([video, image])
    v, i = res.requests
    assert v.state is RequestState.DONE and i.state is RequestState.DONE
    assert v.preemptions >= 1
    cog = get_model("cogvideox-5b")
    assert seen["resident"] == cog.latent_bytes(video.shape) // 4
    assert i.finish < v.finish


def test_batched_requests_share_one_forward_pass():
    a, b = req("a", size=512, steps=4), req("b", size=512, steps=4)

    def script(state):
        ws = state.waiting()
        if not ws:
            return []
        return [Assignment(tuple(sorted(r.id for r in ws)), ws[0].next_stage, (0,),
                           4 if ws[0].next_stage is Stage.DIFFUSE else 0)]

    res = Simulator(CLUSTER, COST, Scripted(script)).run([a, b])
    assert len(res.segments) == 3 and all(seg.request_ids == ("a", "b") for seg in res.segments)
    diffuse = res.segments[1]
    flux = get_model("flux-dev")
    assert diffuse.end - diffuse.start == pytest.approx(4 * COST.step_time(flux, a.shape, 1, batch=2))
    assert res.requests[0].finish == res.requests[1].finish


def _greedy(state):
    out, free = [], list(state.idle_gpus())
    for st in state.waiting():
        if not free:
            break
        g = free.pop(0)
        steps = min(3, st.remaining_steps) if st.next_stage is Stage.DIFFUSE else 0
        out.append(Assignment((st.id,), st.next_stage, (g,), steps))
    return out


def test_noise_is_seeded():
    reqs = [req(f"r{i}", arrival=0.1 * i, steps=9) for i in range(6)]

    def run(seed):
        res = Simulator(CLUSTER, COST, Scripted(_greedy), SimConfig(noise=0.1, seed=seed)).run(reqs)
        return [(s.start, s.end) for s in res.segments]

    assert run(1) == run(1)
    assert run(1) != run(2)
    quiet = Simulator(CLUSTER, COST, Scripted(_greedy), SimConfig(noise=0.0)).run(reqs)
    assert [(s.start, s.end) for s in quiet.segments] != run(1)


def test_a_policy_that_waits_is_replanned_on_the_round_timer():
    def script(state):
        return _greedy(state) if state.now >= 5.0 else []

    policy = Scripted(script)
    res = Simulator(CLUSTER, COST, policy, SimConfig(round_s=2.0)).run([req("a")])
    assert policy.calls[:4] == [0.0, 2.0, 4.0, 6.0]
    assert res.requests[0].state is RequestState.DONE and res.segments[0].start == 6.0


def test_a_policy_that_refuses_work_ends_the_run_with_a_miss():
    res = Simulator(CLUSTER, COST, Scripted(lambda s: []), SimConfig(round_s=1.0)).run([req("a", deadline=100)])
    assert res.requests[0].state is RequestState.FAILED
    m = summarize(res)
    assert m["slo_attainment"] == 0.0 and m["finished"] == 0


def test_an_illegal_plan_is_rejected():
    def script(state):
        ws = state.waiting()
        return [Assignment((w.id,), Stage.ENCODE, (0,)) for w in ws]  # GPU 0 twice

    with pytest.raises(PlanViolation, match="GPU 0 used twice"):
        Simulator(CLUSTER, COST, Scripted(script)).run([req("a"), req("b")])


def test_horizon_cuts_the_run_and_unfinished_requests_miss():
    reqs = [req("a", steps=28, size=2048), req("b", arrival=50.0)]
    res = Simulator(CLUSTER, COST, Scripted(_greedy), SimConfig(horizon_s=10.0)).run(reqs)
    assert res.requests[1].state is RequestState.FAILED
    assert summarize(res)["requests"] == 2
