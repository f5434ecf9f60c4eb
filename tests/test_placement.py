"""Model placement: static splits, the memory rule, weight loads in plans and timelines, input refusal."""
import json

import pytest
from typer.testing import CliRunner

from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.planner.checker import check_plan, check_timeline
from ditplan.planner.cli import app
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.errors import PlacementError
from ditplan.planner.metrics import summarize, timeline_records, unfinished_reasons
from ditplan.planner.placement import (Placement, WeightLoad, apportion, check_fits, load_seconds, static_placement)
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import make_policy
from ditplan.planner.request import Request, RequestStatus, Stage
from ditplan.planner.simulator import SimConfig, Simulator
from ditplan.planner.state import PlannerState

L20 = parse_cluster("4xL20")
COST = CostModel(L20.kind)
IMG, VID = Shape(1024, 1024), Shape(480, 720, 17)


def mixed(n_img=6, n_vid=2):
    reqs = [Request(f"v{i}", "cogvideox-5b", VID, 50, 0.0, 400.0) for i in range(n_vid)]
    reqs += [Request(f"i{i}", "flux-dev", IMG, 28, 2.0 * i, 2.0 * i + 60.0) for i in range(n_img)]
    return reqs


# --- static placements ---------------------------------------------------------------------------

def test_auto_replicates_what_fits_and_splits_what_does_not():
    h100 = parse_cluster("8xH100")
    both = mixed()
    assert static_placement(h100, both, CostModel(h100.kind)).gpus_with("flux-dev") == tuple(range(8))
    split = static_placement(L20, both, COST)  # 31.4 + 19.7 GiB never fit one 48 GB GPU together
    flux, cog = split.gpus_with("flux-dev"), split.gpus_with("cogvideox-5b")
    assert flux and cog and not set(flux) & set(cog) and len(flux) + len(cog) == 4
    for g in range(4):
        assert split.weight_bytes(g) <= L20.gpus[g].memory


def test_split_follows_gpu_seconds_and_gives_every_model_a_gpu():
    assert apportion(8, {"a": 9.0, "b": 1.0}) == {"a": 7, "b": 1}
    assert apportion(8, {"a": 1.0, "b": 1.0}) == {"a": 4, "b": 4}
    assert apportion(8, {"a": 0.0, "b": 5.0, "c": 5.0}) == {"a": 1, "b": 3, "c": 4}
    with pytest.raises(PlacementError, match="3 models"):
        apportion(2, {"a": 1.0, "b": 1.0, "c": 1.0})
    # Videos dominate the GPU-seconds: they get most of the node.
    p = static_placement(L20, mixed(n_img=2, n_vid=4), COST, "split")
    assert len(p.gpus_with("cogvideox-5b")) > len(p.gpus_with("flux-dev")) >= 1


def test_explicit_split_and_its_errors():
    p = static_placement(L20, mixed(), COST, "flux-dev:2,cogvideox-5b:2")
    assert sorted([p.gpus_with("flux-dev"), p.gpus_with("cogvideox-5b")]) == [(0, 1), (2, 3)]
    for spec, needle in [("flux-dev:4", "cogvideox-5b get no GPU"), ("flux-dev:3,cogvideox-5b:3", "6 GPUs per node"),
                         ("nope:2", "known model"), ("flux-dev:x", "integer")]:
        with pytest.raises(PlacementError, match=needle):
            static_placement(L20, mixed(), COST, spec)


# --- the plan checker -----------------------------------------------------------------------------

def state_of(requests, placement, free_at=None):
    return PlannerState(0.0, L20, COST, [RequestStatus(r) for r in requests], free_at or [0.0] * 4, placement)


def test_checker_rejects_work_without_weights_and_bad_loads():
    flux = Request("i", "flux-dev", IMG, 28, 0.0, 60.0)
    only_cog = Placement.of_models([["cogvideox-5b"]] * 4)
    st = state_of([flux], only_cog, [0.0, 0.0, 0.0, 5.0])
    run = RoundPlan((Assignment(("i",), Stage.ENCODE, (0,)),))
    assert any("does not hold the text weights of flux-dev" in p for p in check_plan(st, run))
    # Loading it first makes the GPU busy: the same instant cannot also run on it.
    load = tuple(WeightLoad(0, "flux-dev", c) for c in ("backbone", "text", "vae"))
    evict = tuple(WeightLoad(0, "cogvideox-5b", c) for c in ("backbone", "text", "vae"))
    assert check_plan(st, RoundPlan(unloads=evict, loads=load)) == []
    assert any("used twice" in p for p in check_plan(st, RoundPlan(run.assignments, unloads=evict, loads=load)))
    # Without the eviction both models exceed 48 GB; a busy GPU cannot load; what is resident cannot load again.
    assert any("exceed" in p for p in check_plan(st, RoundPlan(loads=load)))
    assert any("busy" in p for p in check_plan(st, RoundPlan(loads=(WeightLoad(3, "flux-dev", "vae"),))))
    assert any("already resident" in p for p in check_plan(st, RoundPlan(loads=(WeightLoad(1, "cogvideox-5b", "vae"),))))
    assert any("not resident" in p for p in check_plan(st, RoundPlan(unloads=(WeightLoad(1, "flux-dev", "vae"),))))


def test_checker_counts_resident_weights_per_gpu_in_memory():
    # Both models replicated on 48 GB GPUs leave no room: every diffuse assignment breaks the memory rule.
    big = Request("i", "flux-dev", Shape(2048, 2048), 28, 0.0, 60.0)
    st = state_of([big], Placement.replicate(4, ["flux-dev", "cogvideox-5b"]))
    st.requests[0].encoded = True
    problems = check_plan(st, RoundPlan((Assignment(("i",), Stage.DIFFUSE, (0,), 1),)))
    assert any("memory" in p and "exceeds" in p for p in problems)


# --- timelines -------------------------------------------------------------------------------------

def seg(ids, stage, gpus, steps, start, end):
    return {"type": "segment", "request_ids": ids, "stage": stage, "gpus": gpus, "sp": len(gpus),
            "steps": steps, "start": start, "end": end}


def loaded(gpu, model, start=0.0, end=0.0, kind="load"):
    return [{"type": kind, "gpu": gpu, "model": model, "component": c, "start": start, "end": end}
            for c in ("backbone", "text", "vae")]


def test_timeline_checker_replays_loads_and_unloads():
    r = [Request("i", "flux-dev", IMG, 2, 0.0, 60.0)]
    work = [seg(["i"], "encode", [0], 0, 2.0, 2.1), seg(["i"], "diffuse", [0], 2, 2.1, 4.0),
            seg(["i"], "decode", [0], 0, 4.0, 4.2)]
    ok = loaded(0, "cogvideox-5b") + loaded(0, "cogvideox-5b", 1.0, 1.0, "unload") + loaded(0, "flux-dev", 1.0, 2.0)
    assert check_timeline(r, L20, work, weights=ok) == []
    assert any("does not hold the text weights" in p for p in check_timeline(r, L20, work, weights=loaded(0, "cogvideox-5b")))
    early = loaded(0, "flux-dev", 1.0, 2.5)  # the load is still running when the work starts
    assert any("while loading" in p for p in check_timeline(r, L20, work, weights=early))
    both = loaded(0, "cogvideox-5b") + loaded(0, "flux-dev", 1.0, 2.0)  # 51 GiB of weights on a 48 GB GPU
    assert any("exceed" in p for p in check_timeline(r, L20, work, weights=both))
    gone = ok + loaded(0, "flux-dev", 3.0, 3.0, "unload")  # freed in the middle of the diffuse segment
    assert any("does not hold the backbone" in p for p in check_timeline(r, L20, work, weights=gone))


# --- simulation -------------------------------------------------------------------------------------

def test_flux_and_cogvideox_co_serve_on_48gb_gpus_and_cpsat_moves_weights():
    reqs = mixed()
    for name in ("fcfs-sp1", "genserve", "cpsat"):
        result = Simulator(L20, COST, make_policy(name), SimConfig(seed=1)).run(reqs)  # checks every plan
        s = summarize(result)
        assert s["finished"] == len(reqs), name  # before placement: 0 of 8 ran (weights never fit)
        records = timeline_records(result)
        segs = [x for x in records if x["type"] == "segment"]
        weights = [x for x in records if x["type"] in ("load", "unload")]
        outcomes = {x["id"]: x for x in records if x["type"] == "request"}
        assert check_timeline(reqs, L20, segs, outcomes, weights) == [], name
        if name == "cpsat":
            assert s["weight_loads"] == len(result.weight_loads) > 0
            assert s["weight_load_s"] == pytest.approx(sum(e.end - e.start for e in result.weight_loads), abs=1e-5)
            ev = result.weight_loads[0]
            assert ev.end - ev.start == pytest.approx(load_seconds(L20, ev.model, ev.component))
        else:
            assert s["weight_loads"] == 0 and s["weight_load_s"] == 0.0  # peers keep their static split
    again = summarize(Simulator(L20, COST, make_policy("cpsat"), SimConfig(seed=1)).run(reqs))
    assert {k: v for k, v in again.items() if k != "solver_ms"} == {k: v for k, v in s.items() if k != "solver_ms"}


def test_cpsat_beats_a_static_split_when_the_mix_shifts():
    """Videos first, then a burst of images: a static split leaves most GPUs on the wrong model."""
    reqs = [Request(f"v{i}", "cogvideox-5b", VID, 50, 0.0, 600.0) for i in range(3)]
    reqs += [Request(f"i{i}", "flux-dev", IMG, 28, 150.0 + i, 150.0 + i + 45.0) for i in range(6)]
    static = {n: summarize(Simulator(L20, COST, make_policy(n), SimConfig(placement="split")).run(reqs))
              for n in ("edf", "genserve")}
    ours = summarize(Simulator(L20, COST, make_policy("cpsat"), SimConfig(placement="split")).run(reqs))
    best = max(s["slo_attainment"] for s in static.values())
    assert ours["slo_attainment"] > best and ours["weight_loads"] > 0


def test_unfinished_reasons_name_the_missing_weights():
    reqs = mixed(n_img=1, n_vid=1)
    result = Simulator(L20, COST, make_policy("edf"), SimConfig(horizon_s=1.0)).run(reqs)
    lines = unfinished_reasons(result)
    assert len(lines) == 2 and all("run ended first" in x for x in lines)
    result.placement = Placement.of_models([["cogvideox-5b"]] * 4)
    assert any("no GPU holds flux-dev's weights" in x for x in unfinished_reasons(result))


# --- input refusal -----------------------------------------------------------------------------------

def test_a_request_no_gpu_can_hold_is_refused_with_line_model_bytes_and_gpu(tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"nodes": [{"kind": "L20", "gpus": 4, "memory_gib": 24}]}))
    cluster = parse_cluster(str(small))
    with pytest.raises(PlacementError, match=r"line 7: request 'x': model flux-dev needs \d+ bytes"):
        check_fits([Request("x", "flux-dev", IMG, 28, 0.0, 9.0)], cluster, {"x": "line 7"})
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"id": "ok", "arrival": 0, "model": "sd3-medium", "height": 512, "width": 512, "frames": 1, "steps": 4}\n'
                     '{"id": "big", "arrival": 1, "model": "flux-dev", "height": 1024, "width": 1024, "frames": 1, "steps": 4}\n')
    r = CliRunner().invoke(app, ["whatif", "--trace", str(trace), "--cluster", str(small), "-p", "edf", "--no-plot"])
    assert r.exit_code == 2
    flat = " ".join(r.output.split())
    needed = get_model("flux-dev").weight_bytes
    assert "line 2" in flat and "flux-dev" in flat and "largest GPU" in flat and str(24 * 1024**3) in flat
    assert int(flat.split("needs ")[1].split(" ")[0]) > needed


# --- stage-level placement (hetu-ilp) and deployments of a split -----------------------------------

def test_stage_placement_puts_encode_and_decode_gpus_apart_and_the_backbones_together():
    p = static_placement(L20, mixed(), COST, "stages")
    stage = [g for g in range(4) if not p.models_on(g)]
    assert stage and stage == list(range(4 - len(stage), 4))  # the node's last GPUs: blocks stay aligned
    for g in stage:
        assert p.resident[g] == {(m, c) for m in ("flux-dev", "cogvideox-5b") for c in ("text", "vae")}
    for g in set(range(4)) - set(stage):  # 23.8 + 11.1 GB of backbones fit one 48 GB GPU together
        assert p.resident[g] == {("flux-dev", "backbone"), ("cogvideox-5b", "backbone")}
    # auto is hetu-ilp's stages, every other peer's split, when the models do not all fit
    assert static_placement(L20, mixed(), COST, "auto", split="stages") == p
    assert static_placement(L20, mixed(), COST, "auto") == static_placement(L20, mixed(), COST, "split")


def test_hetu_ilp_encodes_and_decodes_on_its_stage_gpus():
    reqs = mixed(n_img=4, n_vid=2)
    result = Simulator(L20, COST, make_policy("hetu-ilp"), SimConfig(seed=0)).run(reqs)  # checks every plan
    assert summarize(result)["finished"] == len(reqs)
    p = result.initial_placement
    stage = {g for g in range(4) if not p.models_on(g)}
    assert stage
    for seg in result.segments:
        where = set(seg.gpus)
        assert (where <= stage) == (seg.stage is not Stage.DIFFUSE), seg
    records = timeline_records(result)
    segs = [x for x in records if x["type"] == "segment"]
    weights = [x for x in records if x["type"] in ("load", "unload")]
    outcomes = {x["id"]: x for x in records if x["type"] == "request"}
    assert check_timeline(reqs, L20, segs, outcomes, weights) == []


def test_a_peer_on_a_split_uses_the_blocks_of_its_own_gpus():
    # FLUX on 3 GPUs of 4 (a 2-block and a single). Only k = 4 (9.1 s of steps) makes a 12 s deadline
    # (k = 2: 15.1 s): edf must treat the request as late now (best effort), not wait for a 4-block
    # its deployment never owns.
    three = Placement.of_models([["cogvideox-5b"]] + [["flux-dev"]] * 3)
    reqs = [Request("i", "flux-dev", IMG, 28, 0.0, 12.0)]
    state = PlannerState(0.0, L20, COST, [RequestStatus(reqs[0], encoded=True)], [0.0] * 4, three)
    plan = make_policy("edf").plan(state)
    assert [(a.stage, set(a.gpus) <= {1, 2, 3}) for a in plan.assignments] == [(Stage.DIFFUSE, True)]
    assert check_plan(state, plan) == []


def test_cpsat_encodes_apart_on_the_gpu_that_holds_the_text_encoders():
    # GPU 0 holds only FLUX's text encoders (an encode GPU), GPU 1 its backbone and VAE: no GPU holds all
    # of FLUX. Encoding on GPU 1 would first load 9.8 GB of text encoders; encoding apart costs 0.1 s
    # and a 3 MB embeddings move.
    two = parse_cluster("2xL20")
    placement = Placement((frozenset({("flux-dev", "text")}), frozenset({("flux-dev", "backbone"), ("flux-dev", "vae")})))
    req = Request("i", "flux-dev", IMG, 28, 0.0, 60.0)
    state = PlannerState(0.0, two, COST, [RequestStatus(req)], [0.0, 0.0], placement)
    plan = make_policy("cpsat").plan(state)
    assert [(a.stage, a.gpus) for a in plan.assignments] == [(Stage.ENCODE, (0,))] and not plan.loads
    assert check_plan(state, plan) == []

    result = Simulator(two, COST, make_policy("cpsat"), SimConfig(placement=placement)).run([req])
    assert not result.weight_loads and summarize(result)["slo_attainment"] == 1.0
    stages = [(s.stage, s.gpus) for s in result.segments]
    assert stages[0] == (Stage.ENCODE, (0,)) and all(g == (1,) for st, g in stages[1:] if st is not Stage.ENCODE)
    diffuse = [s for s in result.segments if s.stage is Stage.DIFFUSE]
    handoff = COST.transfer_time(get_model("flux-dev").embedding_bytes(), two.link_bandwidth(0, 1))
    assert diffuse[0].start - result.segments[0].end == pytest.approx(0.0, abs=1e-9)
    assert diffuse[0].end - diffuse[0].start == pytest.approx(handoff + diffuse[0].steps * COST.step_time(
        get_model("flux-dev"), IMG, 1, 1), rel=1e-9)
