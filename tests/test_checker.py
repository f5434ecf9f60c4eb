import pytest

from models.catalog import Shape
from planner.checker import check_timeline
from planner.cluster import parse_cluster
from planner.request import Request

CLUSTER = parse_cluster("8xH100")
R = [Request("a", "flux-dev", Shape(1024, 1024), 4, 0.0, 10.0),
     Request("b", "flux-dev", Shape(1024, 1024), 4, 1.0, 3.0),
     Request("s", "sdxl", Shape(1024, 1024), 4, 0.0, 10.0)]


def seg(ids, stage, gpus, steps, start, end):
    return {"type": "segment", "request_ids": ids, "stage": stage, "gpus": gpus, "sp": len(gpus),
            "steps": steps, "start": start, "end": end}


def good(rid="a", gpus=(0, 1), t0=0.0):
    g = list(gpus)
    return [seg([rid], "encode", g[:1], 0, t0, t0 + 0.1), seg([rid], "diffuse", g, 2, t0 + 0.1, t0 + 1),
            seg([rid], "diffuse", g, 2, t0 + 1, t0 + 2), seg([rid], "decode", g[:1], 0, t0 + 2, t0 + 2.2)]


def test_a_legal_timeline_passes():
    outcomes = {"a": {"finish": 2.2, "met": True}, "b": {"finish": None, "met": False},
                "s": {"finish": None, "met": False}}
    assert check_timeline(R, CLUSTER, good(), outcomes) == []


@pytest.mark.parametrize("mutate,needle", [
    (lambda t: t + [seg(["b"], "encode", [1], 0, 1.5, 1.6)], "overlap"),
    (lambda t: [dict(t[0], gpus=[1, 2], sp=2)] + t[1:], "not an aligned block"),
    (lambda t: [dict(t[0], sp=2)] + t[1:], "sp 2 != 1"),
    (lambda t: t[:2] + [dict(t[2], steps=3)] + t[3:], "ran 5 diffuse steps of 4"),
    (lambda t: t[:1] + t[2:], "ran 2 diffuse steps of 4"),
    (lambda t: [dict(t[3], start=0.0, end=0.05)] + t[:3], "out of order"),
    (lambda t: [dict(t[0], steps=1)] + t[1:], "encode must have steps = 0"),
    (lambda t: t + [seg(["b"], "encode", [4], 0, 0.5, 0.6)], "before request 'b' arrives"),
    (lambda t: t + [seg(["a", "s"], "encode", [5], 0, 3, 4)], "incompatible"),
    (lambda t: t + [seg(["s"], "diffuse", [6, 7], 1, 3, 4)], "SP degree 2 illegal for sdxl"),
    (lambda t: t + [seg(["zz"], "encode", [6], 0, 3, 4)], "unknown"),
])
def test_each_violation_is_named(mutate, needle):
    problems = check_timeline(R, CLUSTER, mutate(good()))
    assert any(needle in p for p in problems), problems


def test_outcome_records_are_checked_against_segments_and_deadlines():
    assert any("finish 9.0 != decode end" in p for p in
               check_timeline(R[:1], CLUSTER, good(), {"a": {"finish": 9.0, "met": True}}))
    late = good(rid="b", t0=1.0)  # finishes at 3.2 > deadline 3.0
    assert any("met=True" in p for p in
               check_timeline(R[1:2], CLUSTER, late, {"b": {"finish": 3.2, "met": True}}))
    assert check_timeline(R[1:2], CLUSTER, late, {"b": {"finish": 3.2, "met": False}}) == []
