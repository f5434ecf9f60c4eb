"""The what-if CLI end to end: outputs, determinism, and refusal of bad input."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ditplan.models.cost import CostModel
from ditplan.planner.checker import check_timeline
from ditplan.planner.cli import app
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.metrics import read_timeline
from ditplan.planner.traces import read_trace
from ditplan.planner.whatif import to_requests

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


# --- issue 11: which policies, progress, quiet stdout, where the plots go ------------------------------------

def test_all_leaves_out_the_slow_milp_policies_unless_asked(tmp_path):
    out = tmp_path / "m.json"
    r = invoke("whatif", "--workload", "tetriserve-uniform", "--n", 2, "--cluster", "2xH100", "--policy", "all",
               "--no-plot", "--json", out)
    assert r.exit_code == 0, r.output
    ran = set(json.loads(out.read_text()))
    assert {"cpsat", "edf", "genserve", "hetu-ilp", "tetriserve-dp"} <= ran
    assert not ran & {"milp", "milp-highs", "offline-bound"}
    assert "all+milp" in r.output  # says what it left out and how to get it
    r = invoke("whatif", "--workload", "tetriserve-uniform", "--n", 2, "--cluster", "2xH100", "--policy", "all+milp",
               "--no-plot", "--json", out)
    assert r.exit_code == 0, r.output
    assert set(json.loads(out.read_text())) == ran | {"milp", "milp-highs"}
    assert "leaves out" not in r.output


def test_no_solver_banner_on_stdout(tmp_path):
    """HiGHS prints its banner from C on fd 1; stdout must carry the table alone."""
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from ditplan.planner.cli import main; main()", "whatif", "-p", "milp-highs",
           "--workload", "tetriserve-uniform", "--n", "3", "--cluster", "2xH100", "--no-plot"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "HiGHS" not in p.stdout and "licence" not in p.stdout, p.stdout[:300]
    assert p.stdout.lstrip().startswith("workload tetriserve-uniform")  # the table's title comes first
    assert "milp-highs" in p.stdout


def test_progress_lines_carry_the_eta():
    from ditplan.planner.whatif import PolicyProgress

    now = [100.0]
    lines: list[str] = []
    rep = PolicyProgress(["edf", "milp"], lines.append, every_s=10.0, clock=lambda: now[0])
    rep.start("milp")
    for t, done in ((5.0, 10), (12.0, 30), (15.0, 40), (24.0, 60)):
        now[0] = 100.0 + t
        rep.update("milp", done, 100)
    # one line per 10 s at most: at 12 s (30 done: ETA 12 * 70 / 30 = 28 s) and at 24 s (60 done: 16 s)
    assert lines == ["[2/2] milp: 30/100 requests finished, 12.0 s, ETA 28.0 s",
                     "[2/2] milp: 60/100 requests finished, 24.0 s, ETA 16.0 s"]
    now[0] = 100.0 + 400
    assert rep.eta("milp", 80, 100) == pytest.approx(100.0)  # 400 s for 80: 100 s to go
    assert rep.eta("milp", 0, 100) == float("inf")  # nothing finished yet: unknown, shown as "?"


def test_whatif_reports_each_policy_done_and_the_eta_format():
    from ditplan.planner.whatif import fmt_duration

    assert [fmt_duration(s) for s in (7.24, 325.0, 3725.0, float("inf"))] == ["7.2 s", "5m 25s", "1h 02m", "?"]
    r = invoke("whatif", "--workload", "tetriserve-uniform", "--n", 6, "--cluster", "2xH100", "-p", "edf",
               "-p", "rssp", "--no-plot")
    assert r.exit_code == 0, r.output
    text = r.output
    assert "[1/2] edf: done in" in text and "[2/2] rssp: done in" in text
    assert text.index("[1/2] edf") < text.index("[2/2] rssp")


def test_plots_go_beside_json_and_the_gantt_is_the_policy_that_matters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "m.json"
    r = invoke("whatif", "--workload", "tetriserve-uniform", "--n", 6, "--cluster", "2xH100", "-p", "edf",
               "-p", "cpsat", "-p", "rssp", "--json", run)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "runs" / "m-attainment.png").exists() and (tmp_path / "runs" / "m-gantt.png").exists()
    assert not (tmp_path / "out").exists()  # the demo's out/whatif-*.png are left alone
    assert "Gantt chart of cpsat" in " ".join(r.output.split())
    # No cpsat: the first policy given.
    r = invoke("whatif", "--workload", "tetriserve-uniform", "--n", 6, "--cluster", "2xH100", "-p", "rssp",
               "-p", "edf", "--plot", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert "Gantt chart of rssp" in " ".join(r.output.split()) and (tmp_path / "p-gantt.png").exists()
    # One chart per policy on request.
    r = invoke("whatif", "--workload", "tetriserve-uniform", "--n", 6, "--cluster", "2xH100", "-p", "rssp",
               "-p", "edf", "--plot", tmp_path / "q", "--gantt-policy", "all", "--gantt-color", "outcome")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q-gantt-rssp.png").exists() and (tmp_path / "q-gantt-edf.png").exists()
    assert not (tmp_path / "q-gantt.png").exists()
    r = invoke("whatif", "--n", 2, "-p", "edf", "--gantt-policy", "cpsat", "--no-plot")
    assert r.exit_code == 2 and "'cpsat' is not among the policies run" in " ".join(r.output.split())
