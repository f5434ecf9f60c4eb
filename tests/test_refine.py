"""Cost refinement: step-time estimates from reports converge, resist outliers, and reach every planner.

The refiner on its own, the corrected cost-model view, and the service core driven in-process
(``ManualClock``, ``plan_once``, no gRPC) started with a profile wrong by 2x.
"""
from __future__ import annotations

import pytest

from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.models.profiles import builtin_profiles, parse_profile
from ditplan.models.refine import RefineConfig, StepKey, StepRefiner
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.request import Request, RequestStatus, Stage
from ditplan.planner.service import convert
from ditplan.planner.service.admission import RequestSpec
from ditplan.planner.service.clock import ManualClock
from ditplan.planner.service.core import CoreConfig, PlannerCore
from ditplan.planner.service.journal import Journal
from ditplan.planner.service.messages import StepReport
from ditplan.planner.service.planning import PlannerProcess, plan_checked
from ditplan.planner.policies.base import make_policy
from ditplan.planner.state import PlannerState

FLUX = get_model("flux-dev")
SHAPE = Shape(1024, 1024)
KEY = StepKey("flux-dev", SHAPE, 1, 1)
K = 3  # reports after which a 2x-wrong prior predicts within 5% (defaults: max_step 1.25, min_reports 3)


def scaled_profile(factor: float):
    """The built-in L20 table with every step time scaled by ``factor``."""
    doc = builtin_profiles()[0].to_doc()
    for row in doc["points"]:
        row["step_s"] *= factor
    doc["name"] = f"hetu-x{factor:g}"
    return parse_profile(doc)


# --- the refiner ----------------------------------------------------------------------------------------
def test_a_2x_wrong_prior_is_within_5_percent_after_3_reports_and_exact_after_4():
    r = StepRefiner()
    factors = []
    for _ in range(5):
        r.observe(KEY, 1.0, 2.0)  # truth 1.0 s, prior 2.0 s
        factors.append(r.estimate(KEY).factor)
    assert factors[:K] == pytest.approx([0.8, 0.64, 0.512])  # at most max_step per report
    assert abs(factors[K - 1] * 2.0 - 1.0) < 0.05
    assert factors[3:] == pytest.approx([0.5, 0.5])
    assert [r.estimate(KEY).in_use, r.corrections()] == [True, {KEY: pytest.approx(0.5)}]


def test_an_outlier_moves_an_estimate_by_at_most_max_step_and_a_lone_one_not_at_all():
    cold = StepRefiner()
    assert not cold.observe(KEY, 100.0, 1.0)  # first report, 100x: not in use yet
    assert cold.estimate(KEY).factor == pytest.approx(1.25) and cold.corrections() == {}
    warm = StepRefiner()
    for _ in range(4):
        warm.observe(KEY, 1.0, 1.0)
    version = warm.version
    assert not warm.observe(KEY, 100.0, 1.0)  # the median of [1, 1, 1, 1, 100] is 1
    assert warm.estimate(KEY).factor == 1.0 and warm.version == version
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        assert not warm.observe(KEY, bad, 1.0) and not warm.observe(KEY, 1.0, bad)
    assert warm.estimate(KEY).reports == 5


def test_estimates_are_used_from_min_reports_and_the_oldest_key_is_forgotten_beyond_max_keys():
    r = StepRefiner(RefineConfig(min_reports=2, max_keys=2))
    other, third = KEY._replace(sp=2), KEY._replace(batch=2)
    assert not r.observe(KEY, 1.0, 1.0) and r.observe(KEY, 1.0, 1.0)  # in use at the 2nd report
    r.observe(other, 1.0, 1.0)
    assert r.observe(third, 1.0, 1.0)  # evicts KEY, which was in use
    assert [e.key for e in r.estimates()] == [third, other]  # by model, shape, degree, batch
    with pytest.raises(ValueError, match="max_step = 1.0"):
        RefineConfig(max_step=1.0)
    with pytest.raises(ValueError, match="window = 0"):
        RefineConfig(window=0)


def test_a_corrected_view_scales_only_its_key_and_leaves_the_prior_alone():
    cost = CostModel("L20")
    prior = cost.step_time(FLUX, SHAPE, 1)
    view = cost.with_corrections({KEY: 0.5})
    assert view.step_time(FLUX, SHAPE, 1) == pytest.approx(prior / 2)
    assert view.prior_step_time(FLUX, SHAPE, 1) == cost.step_time(FLUX, SHAPE, 1) == prior
    assert view.step_time(FLUX, SHAPE, 2) == cost.step_time(FLUX, SHAPE, 2)  # another degree: its prior
    assert view.step_time(FLUX, SHAPE, 1, 2) == cost.step_time(FLUX, SHAPE, 1, 2)  # another batch
    assert view.ideal_latency(FLUX, SHAPE, 28, max_sp=1) < cost.ideal_latency(FLUX, SHAPE, 28, max_sp=1)


# --- the service core -------------------------------------------------------------------------------------
@pytest.fixture
def core(tmp_path):
    cluster = parse_cluster("1xL20")
    journal, recovered = Journal.open(tmp_path / "state")
    cost = CostModel(cluster.kind, [scaled_profile(2.0)])  # every step time 2x the truth
    c = PlannerCore(CoreConfig(cluster=cluster, cost=cost, policy="edf"), journal, recovered, ManualClock())
    yield c
    c.stop()
    journal.close()


def _diffuse(core, sess):
    """Plan until a diffuse assignment comes; the encode before it is reported done at once."""
    for _ in range(3):
        core.plan_once()
        while (d := sess.next(0)) is not None:
            for a in d.assignments:
                if a.stage is Stage.DIFFUSE:
                    return d.plan_epoch, a
                core.report(StepReport(sess.id, d.plan_epoch, a.request_ids, a.stage, done=True,
                                       session_secret=sess.secret), wait=True)
    raise AssertionError("no diffuse assignment")


def test_refinement_converges(core):
    """A core whose profile says 2x the true step time predicts within 5% after K = 3 reports at the
    true time, exactly after 4, and one 100x report does not move it."""
    truth = CostModel("L20").step_time(FLUX, SHAPE, 1)  # the built-in table: 0.84 s
    sess = core.connect_executor("ex", [0], heartbeats=False)
    core.submit([RequestSpec("a", "flux-dev", 1024, 1024, 1, 50, deadline_in_s=1e4)])
    predicted = []
    for i in range(6):
        epoch, a = _diffuse(core, sess)
        predicted.append(a.predicted_step_s)
        step = truth * (100.0 if i == 5 else 1.0)  # the last report is an outlier
        core.clock.advance(a.steps * step)
        core.report(StepReport(sess.id, epoch, a.request_ids, a.stage, a.steps, (step,) * a.steps, True,
                               session_secret=sess.secret), wait=True)
    assert predicted[:K] == pytest.approx([2 * truth] * K)  # the profile's, until K reports
    assert predicted[K] == pytest.approx(truth, rel=0.05)  # after K reports: within 5%
    assert predicted[K + 1:] == pytest.approx([truth] * 2, rel=1e-9)
    after_outlier = core.cost.step_time(FLUX, SHAPE, 1)
    assert after_outlier == pytest.approx(truth, rel=1e-9)  # the median of the window ignores it
    [est] = core.info().step_estimates
    assert (est.key, est.reports, est.in_use) == (KEY, 6, True)
    assert est.seconds == pytest.approx(truth) and est.prior_s == pytest.approx(2 * truth)
    # What GetServerInfo carries, through the protobuf.
    assert convert.info_from_pb(convert.info_to_pb(core.info())).step_estimates == (est,)


def test_the_estimates_are_prometheus_gauges(core):
    from ditplan.planner.service.metrics import CoreCollector

    sess = core.connect_executor("ex", [0], heartbeats=False)
    core.submit([RequestSpec("a", "flux-dev", 1024, 1024, 1, 50, deadline_in_s=1e4)])
    epoch, a = _diffuse(core, sess)
    core.report(StepReport(sess.id, epoch, a.request_ids, a.stage, a.steps, (0.9,) * a.steps, True,
                           session_secret=sess.secret), wait=True)
    samples = {(m.name, s.labels.get("shape")): s for m in CoreCollector(core).collect() for s in m.samples}
    est = samples[("ditplan_step_time_estimate_seconds", "1024x1024")]
    assert est.labels == {"model": "flux-dev", "shape": "1024x1024", "sp": "1", "batch": "1"}
    assert est.value == pytest.approx(2 * 0.84 / 1.25)  # one report: moved by max_step
    assert samples[("ditplan_step_time_reports", "1024x1024")].value == 1
    assert samples[("ditplan_step_time_estimate_in_use", "1024x1024")].value == 0


def test_the_planner_process_plans_on_the_refined_costs():
    """The child gets the profiles and each new set of corrections: its plan is the in-process one."""
    cluster = parse_cluster("1xL20")
    cost = CostModel(cluster.kind, [scaled_profile(2.0)])
    req = RequestStatus(Request("a", "flux-dev", SHAPE, 50, 0.0, 1e4), encoded=True)

    def state(c):
        return PlannerState(0.0, cluster, c, [req], [0.0], ("flux-dev",), 4.0)

    proc = PlannerProcess("1xL20", "edf", None, gpu=cost.gpu.name, profiles=cost.profiles)
    try:
        steps = []
        for c in (cost, cost.with_corrections({KEY: 0.5}), cost):
            [a] = proc.plan(state(c)).plan.assignments
            [local] = plan_checked(make_policy("edf"), None, state(c)).plan.assignments
            steps.append((a.steps, local.steps))
    finally:
        proc.close()
    # a round of 4 s: 2 steps at the profile's 1.68 s, 4 at the refined 0.84 s
    assert steps == [(2, 2), (4, 4), (2, 2)]
