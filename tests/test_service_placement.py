"""Placement through the service: initial weights at connect, loads streamed and reported, admission.

Real in-process servers on loopback ports; the executor is an ``ExecutorLink``
driven by the test, so every load, report and assignment is observed.
"""
from __future__ import annotations

import json

import grpc
from typer.testing import CliRunner

from ditplan.planner.cli import app

from ditplan.planner.placement import WeightLoad
from ditplan.planner.request import Stage
from ditplan.planner.service.client import PlannerClient
from ditplan.planner.service.executor_link import ExecutorLink
from ditplan.planner.service.messages import StepReport
from ditplan.planner.service.stateless import PlanIn, ProgressIn
from ditplan.planner.traces import TraceRecord
from test_service import make_server, refused, spec, wait_for  # noqa: F401 (fixture)


def _updates_until(link: ExecutorLink, pred, timeout: float = 20.0):
    """Plan updates (absorbed) until one satisfies ``pred``; returns it."""
    return wait_for(lambda: (d if pred(d := link.next_update(timeout)) else None), timeout, what="plan update")


def test_executor_gets_its_placement_then_streamed_loads_and_work_waits_for_them(make_server):
    server = make_server(cluster="2xL20", policy="cpsat", models=("flux-dev",), placement="replicate")
    with PlannerClient(server.address, timeout=10) as c:
        info = c.info()
        assert info.placement == (("flux-dev/backbone", "flux-dev/text", "flux-dev/vae"),) * 2
        link = ExecutorLink(c, "node0", gpus=[0, 1])
        try:
            first = link.next_update(10)
            assert {(x.weight.gpu, x.weight.model, x.weight.component) for x in first.loads} == \
                {(g, "flux-dev", comp) for g in (0, 1) for comp in ("backbone", "text", "vae")}
            assert all(x.initial and x.predicted_s > 0 for x in first.loads)

            # cogvideox-5b is held nowhere: cpsat (which places models) admits it and loads it first.
            c.submit([spec("s", "cogvideox-5b", 480, frames=17, steps=8, slo_scale=6.0)])
            d = _updates_until(link, lambda d: d.loads)
            assert not d.assignments, "work was assigned before its weights were in"
            loads = [x.weight for x in d.loads]
            gpus = {w.gpu for w in loads}
            assert len(gpus) == 1 and all(w.model == "cogvideox-5b" and not x.initial for w, x in zip(loads, d.loads))
            g = gpus.pop()
            # 33.7 GB of FLUX + 21.1 GB of CogVideoX exceed an L20's 48 GiB: FLUX's weights on g make room.
            assert {(w.gpu, w.model) for w in d.unloads} == {(g, "flux-dev")}
            info = c.info()
            assert info.weight_loads == len(loads)
            assert any(w.startswith("cogvideox-5b/") for w in info.placement[g])
            gone = {f"{w.model}/{w.component}" for w in d.unloads}
            assert "flux-dev/backbone" in gone and not gone & set(info.placement[g])

            # A load no plan started is refused; the real one is accepted and frees the GPU.
            bogus = WeightLoad(1 - g, "sdxl", "backbone")
            assert refused(link.report, StepReport("node0", d.plan_epoch, loaded=(bogus,))).code \
                is grpc.StatusCode.FAILED_PRECONDITION
            link.report(StepReport("node0", d.plan_epoch, loaded=tuple(loads)))
            d2 = _updates_until(link, lambda d: d.assignments)
            (a,) = d2.assignments
            assert a.request_ids == ("s",) and a.stage is Stage.ENCODE and a.gpus == (g,)
            link.report(StepReport("node0", d2.plan_epoch, ("s",), Stage.ENCODE, done=True))
        finally:
            link.close()


def test_a_failed_load_frees_the_gpu_and_the_planner_tries_again(make_server):
    server = make_server(cluster="2xL20", policy="cpsat", models=("flux-dev",), placement="replicate")
    with PlannerClient(server.address, timeout=10) as c:
        link = ExecutorLink(c, "node0", gpus=[0, 1])
        try:
            link.next_update(10)
            c.submit([spec("s", "cogvideox-5b", 480, frames=17, steps=8, slo_scale=6.0)])
            d = _updates_until(link, lambda d: d.loads)
            failed = tuple(x.weight for x in d.loads)
            link.report(StepReport("node0", d.plan_epoch, load_failed=failed))
            # The failed weights left the placement, so the planner loads them again (the GPU is free).
            again = _updates_until(link, lambda d: d.loads)
            assert {x.weight.model for x in again.loads} == {"cogvideox-5b"} and not any(x.initial for x in again.loads)
            assert c.info().weight_loads >= len(failed) + len(again.loads)  # the retry is dispatched and counted
            link.report(StepReport("node0", again.plan_epoch, loaded=tuple(x.weight for x in again.loads)))
            (a,) = _updates_until(link, lambda d: d.assignments).assignments
            assert a.request_ids == ("s",) and a.stage is Stage.ENCODE
        finally:
            link.close()


def test_admission_refuses_what_this_deployment_can_never_serve(make_server, tmp_path):
    # A static policy serves only the placed models.
    static = make_server(cluster="2xL20", policy="edf", models=("flux-dev",))
    with PlannerClient(static.address, timeout=10) as c:
        err = refused(c.submit, [spec("a", "flux-dev"), spec("b", "sd3-medium")])
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "requests[1]" in err.details and "'sd3-medium' is not served here" in err.details
        assert c.list() == []  # all-or-nothing
        (ok, bad) = c.submit([spec("a", "flux-dev"), spec("b", "sd3-medium")], allow_partial=True)
        assert ok.accepted and not bad.accepted and bad.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]

    # Without --models every model is on every GPU: one that does not fit beside the others is refused.
    legacy = make_server(cluster="2xL20")
    with PlannerClient(legacy.address, timeout=10) as c:
        c.submit([spec("f", "flux-dev")])
        err = refused(c.submit, [spec("v", "cogvideox-5b", 720, frames=49, steps=50)])
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "'cogvideox-5b' does not fit beside flux-dev" in err.details and "--models" in err.details

    # A model whose weights and activations exceed every GPU: refused whatever the placement.
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"nodes": [{"kind": "L20", "gpus": 2, "memory_gib": 24}]}))
    tiny = make_server(cluster=str(small), policy="cpsat", models=("sd3-medium",))
    with PlannerClient(tiny.address, timeout=10) as c:
        err = refused(c.submit, [spec("big", "flux-dev")])
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "request 'big': model flux-dev needs" in err.details and "bytes" in err.details
        records = [TraceRecord("ok", 0.0, "sd3-medium", 512, 512, 1, 4), TraceRecord("big", 1.0, "flux-dev", 1024, 1024, 1, 4)]
        err = refused(c.whatif, records, cluster=small.read_text(), policies=["edf"])
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "records[1]: request 'big'" in err.details


def test_simulated_service_co_serves_models_that_do_not_fit_together(make_server):
    server = make_server(cluster="4xL20", policy="cpsat", simulate=True, speed=100.0,
                         models=("flux-dev", "cogvideox-5b"))
    with PlannerClient(server.address, timeout=10) as c:
        placement = c.info().placement
        assert {w.split("/")[0] for ws in placement for w in ws if w.endswith("/backbone")} == \
            {"flux-dev", "cogvideox-5b"}
        c.submit([spec("v", "cogvideox-5b", 480, frames=17, steps=10, slo_scale=5.0)]
                 + [spec(f"i{k}", "flux-dev", 512, steps=8, slo_scale=5.0) for k in range(3)])
        def all_done():
            rows = c.list()
            return rows if all(r.state == "done" for r in rows) else None

        assert len(wait_for(all_done, 60, what="every request done")) == 4
    r = CliRunner().invoke(app, ["status", "--server", server.address])
    assert r.exit_code == 0, r.output
    assert "placement (backbones by GPU):" in r.stdout and "cogvideox-5b: " in r.stdout and "flux-dev: " in r.stdout


def test_plan_rpc_takes_a_per_gpu_placement(make_server):
    server = make_server(cluster="2xL20", policy="edf")
    with PlannerClient(server.address, timeout=10) as c:
        req = ProgressIn("r", "flux-dev", 1024, 1024, 1, 28, 0.0, 100.0)
        held = [["sd3-medium/backbone"], ["flux-dev/backbone", "flux-dev/text", "flux-dev/vae"]]
        out = c.plan(PlanIn(now=0.0, cluster="2xL20", requests=[req], policy="edf", placement=held))
        assert out.problems == []
        assert [a.gpus for a in out.plan.assignments] == [(1,)]
        bad = refused(c.plan, PlanIn(now=0.0, cluster="2xL20", requests=[req], policy="edf",
                                     placement=[["flux-dev/engine"], []]))
        assert bad.code is grpc.StatusCode.INVALID_ARGUMENT and "placement" in bad.details and "engine" in bad.details
