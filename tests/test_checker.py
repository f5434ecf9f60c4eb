import json

import pytest

from ditplan.models.catalog import Shape
from ditplan.planner.checker import check_timeline
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.request import Request

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


def test_checker_command_checks_a_timeline_file_against_its_trace(tmp_path, capsys):
    from typer.testing import CliRunner

    from ditplan.planner.checker import main
    from ditplan.planner.cli import app
    from ditplan.planner.traces import TraceRecord, write_trace

    trace, timeline = tmp_path / "t.jsonl", tmp_path / "timeline.jsonl"
    write_trace(trace, [TraceRecord(f"r{i}", 2.0 * i, "flux-dev", 1024, 1024, 1, 28) for i in range(4)])
    r = CliRunner().invoke(app, ["whatif", "--trace", str(trace), "--cluster", "4xL20", "-p", "edf",
                                 "--timeline", str(timeline), "--no-plot"])
    assert r.exit_code == 0, r.output
    assert main([str(trace), str(timeline), "--cluster", "4xL20"]) == 0
    assert "legal" in capsys.readouterr().out
    # Two segments on one GPU at once: the file is refused, naming the overlap.
    lines = timeline.read_text().splitlines()
    segs = [i for i, x in enumerate(lines) if '"type":"segment"' in x]
    a, b = json.loads(lines[segs[0]]), json.loads(lines[segs[-1]])
    b.update(gpus=a["gpus"], sp=len(a["gpus"]), start=a["start"], end=a["end"])
    lines[segs[-1]] = json.dumps(b)
    timeline.write_text("\n".join(lines) + "\n")
    assert main([str(trace), str(timeline), "--cluster", "4xL20"]) == 1
    out = capsys.readouterr().out
    assert "problem(s)" in out and "overlap" in out.lower()
    assert main([str(trace), str(tmp_path / "missing.jsonl"), "--cluster", "4xL20"]) == 2
