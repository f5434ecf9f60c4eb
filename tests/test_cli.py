"""The what-if CLI end to end: outputs, determinism, and refusal of bad input."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.cost import CostModel
from planner.checker import check_timeline
from planner.cli import app
from planner.cluster import parse_cluster
from planner.metrics import read_timeline
from planner.traces import read_trace
from planner.whatif import to_requests

runner = CliRunner()
KEYS = {"slo_attainment", "slo_attainment_by_kind", "latency_s", "gpu_seconds", "preemptions", "sp_changes",
        "requests", "finished", "solver_ms"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_trace_gen_then_whatif_writes_the_contract(tmp_path):
    trace = tmp_path / "t.jsonl"
    r = invoke("trace", "gen", "--workload", "genserve-mixed", "--n", 30, "--seed", 3, "--out", trace)
    assert r.exit_code == 0, r.output
    assert len(trace.read_text().splitlines()) == 30
    out, tl = tmp_path / "m.json", tmp_path / "tl.jsonl"
    r = invoke("whatif", "--trace", trace, "--cluster", "4xH100", "--policy", "edf", "--json", out,
               "--timeline", tl, "--plot", tmp_path / "p")
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())["edf"]
    assert KEYS <= set(m)
    assert set(m["latency_s"]) == {"p50", "p95", "p99", "mean"} and set(m["solver_ms"]) == {"p50", "p99", "max"}
    assert set(m["slo_attainment_by_kind"]) == {"image", "video"} and m["requests"] == 30
    assert (tmp_path / "p-attainment.png").stat().st_size > 5000 and (tmp_path / "p-gantt.png").stat().st_size > 5000
    # The timeline validates independently, and agrees with the summary.
    cluster = parse_cluster("4xH100")
    reqs = to_requests(read_trace(trace), CostModel(cluster.kind), cluster, 1.5)
    segments, outcomes, weights = read_timeline(tl)
    assert check_timeline(reqs, cluster, segments, outcomes) == []
    assert sum(o["met"] for o in outcomes.values()) / 30 == pytest.approx(m["slo_attainment"], abs=1e-6)
    assert sum(len(s["gpus"]) * (s["end"] - s["start"]) for s in segments) == pytest.approx(m["gpu_seconds"], rel=1e-4)


def _strip_timing(doc: dict) -> dict:
    return {p: {k: v for k, v in m.items() if k != "solver_ms"} for p, m in doc.items()}


def test_same_seed_same_bytes(tmp_path):
    outs = []
    for i in range(2):
        out, tl = tmp_path / f"m{i}.json", tmp_path / f"t{i}.jsonl"
        r = invoke("whatif", "--workload", "tetriserve-skewed", "--n", 40, "--seed", 7, "--noise", 0.05,
                   "--policy", "tetriserve-dp", "--json", out, "--timeline", tl, "--no-plot")
        assert r.exit_code == 0, r.output
        outs.append((out, tl))
    (a, ta), (b, tb) = outs
    assert ta.read_bytes() == tb.read_bytes()  # the timeline: byte for byte
    # solver_ms is the one wall-clock measurement; everything else is byte-identical.
    assert json.dumps(_strip_timing(json.loads(a.read_text()))) == json.dumps(_strip_timing(json.loads(b.read_text())))
    r = invoke("whatif", "--workload", "tetriserve-skewed", "--n", 40, "--seed", 8, "--noise", 0.05,
               "--policy", "tetriserve-dp", "--timeline", tmp_path / "t9.jsonl", "--no-plot")
    assert (tmp_path / "t9.jsonl").read_bytes() != ta.read_bytes()


def _line(**kw):
    base = {"id": "a", "arrival": 0.0, "model": "flux-dev", "height": 512, "width": 512, "frames": 1, "steps": 28}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize("bad,needle", [
    (_line(id="b", model="flux-xl"), ["t.jsonl:3", "'model'", "'flux-xl'"]),
    (_line(id="b", height=-5), ["t.jsonl:3", "'height'", "-5"]),
    (_line(id="b", steps=0), ["t.jsonl:3", "'steps'", "0"]),
    (_line(id="a"), ["t.jsonl:3", "duplicate", "'a'"]),
    (_line(id="b", arrival=5.0, deadline=2.0), ["t.jsonl:3", "'deadline'", "2.0"]),
    (_line(id="b", frames=0), ["t.jsonl:3", "'frames'", "0"]),
    ("{not json", ["t.jsonl:3"]),
])
def test_bad_trace_is_refused_whole_with_exit_2(tmp_path, bad, needle):
    trace = tmp_path / "t.jsonl"
    trace.write_text(_line(id="a") + "\n" + _line(id="z", arrival=0.5) + "\n" + bad + "\n")
    out = tmp_path / "m.json"
    r = invoke("whatif", "--trace", trace, "--json", out, "--no-plot")
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    for n in needle:
        assert n in text, (n, text)
    assert not out.exists()  # nothing half-simulated


@pytest.mark.parametrize("args,needle", [
    (["--cluster", "3xH100"], "3 must be 1, 2, 4 or 8"),
    (["--cluster", "8xTPU"], "'TPU'"),
    (["--policy", "magic"], "'magic' is unknown"),
    (["--workload", "nope"], "nope"),
    (["--policy", "edf", "--policy", "rssp", "--timeline", "x.jsonl"], "exactly one --policy"),
])
def test_bad_options_exit_2_and_name_the_value(tmp_path, args, needle):
    r = invoke("whatif", "--n", 5, "--no-plot", *args)
    assert r.exit_code == 2, r.output
    assert needle in " ".join(r.output.split())


def test_bad_cluster_file_is_refused(tmp_path):
    spec = tmp_path / "c.json"
    spec.write_text(json.dumps({"nodes": [{"kind": "H100", "gpus": 6}]}))
    r = invoke("whatif", "--cluster", spec, "--n", 5, "--no-plot")
    assert r.exit_code == 2 and "'gpus' = 6" in " ".join(r.output.split())


def test_hetu_trace_needs_a_model(tmp_path):
    t = tmp_path / "mytrace.txt"
    t.write_text("Request(request_id=0, timestamp=0.0, height=1024, width=1024, num_frames=1, num_inference_steps=28)\n")
    r = invoke("whatif", "--trace", t, "--no-plot", "--policy", "edf")
    assert r.exit_code == 2 and "--model" in r.output
    r = invoke("whatif", "--trace", t, "--model", "flux-dev", "--no-plot", "--policy", "edf")
    assert r.exit_code == 0, r.output


def test_offline_bound_reports_a_bound_no_policy_beats(tmp_path):
    out = tmp_path / "m.json"
    r = invoke("whatif", "--workload", "tetriserve-uniform", "--n", 8, "--seed", 2, "--policy", "edf",
               "--policy", "tetriserve-dp", "--policy", "offline-bound", "--offline-budget", 0.3,
               "--no-plot", "--json", out)
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    bound = m["offline-bound"]["slo_attainment_upper_bound"]
    assert m["offline-bound"]["slo_attainment"] <= bound <= 1.0
    assert all(m[p]["slo_attainment"] <= bound + 1e-9 for p in ("edf", "tetriserve-dp"))
    assert "slo_attainment_upper_bound" not in m["edf"]  # only the offline solve proves a bound
