from ditplan.models.catalog import Shape
from ditplan.models.cost import CostModel
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.problem import RoundProblem, build_problem, load_problems, save_problems
from ditplan.planner.request import Request, RequestStatus, Stage
from ditplan.planner.state import PlannerState


def test_round_problem_captures_state_and_round_trips_through_json(tmp_path):
    cluster, cost = parse_cluster("2x4xA40"), CostModel("A40")
    fresh = RequestStatus(Request("a", "flux-dev", Shape(1024, 1024), 28, 0.0, 30.0))
    moved = RequestStatus(Request("b", "cogvideox-5b", Shape(480, 720, 49), 50, 1.0, 500.0),
                          encoded=True, steps_done=10, latent_gpus=(0, 1), sp=2)
    state = PlannerState(5.0, cluster, cost, [fresh, moved], [0.0] * 4 + [9.0] * 4,
                         ("flux-dev", "cogvideox-5b"), 2.0, frozenset({"b"}))
    p = build_problem(state)
    a, b = p.requests
    assert (a.stage, b.stage) == (Stage.ENCODE, Stage.DIFFUSE)
    assert a.deadline == 25.0 and b.remaining_steps == 40 and b.was_running and not a.was_running
    assert set(a.step_s) == {1, 2, 4} and a.step_s[4] < a.step_s[1]
    assert b.move_s[0] > 0 and b.move_s[1] > b.move_s[0]  # same node over NVLink, other node over the network
    assert a.move_s == {0: 0.0, 1: 0.0}  # nothing to move yet
    assert p.idle == (0, 1, 2, 3) and p.gpus[5].free_in == 4.0
    assert p.gpus[0].memory_free < p.gpus[2].memory_free  # b's latent is resident on GPUs 0-1
    assert RoundProblem.from_dict(p.to_dict()) == p
    path = tmp_path / "problems.jsonl"
    assert save_problems(path, [p, p]) == 2
    assert load_problems(path) == [p, p]
    assert [r.stage for r in load_problems(path)[0].requests] == [Stage.ENCODE, Stage.DIFFUSE]
    assert all(type(r.stage) is Stage for r in load_problems(path)[0].requests)  # the enum, not its string


def test_whatif_dumps_the_round_problems_it_saw(tmp_path):
    from typer.testing import CliRunner

    from ditplan.planner.cli import app

    out = tmp_path / "rp.jsonl"
    r = CliRunner().invoke(app, ["whatif", "--workload", "genserve-mixed", "--n", "15", "--policy", "edf",
                                 "--no-plot", "--dump-problems", str(out)])
    assert r.exit_code == 0, r.output
    problems = load_problems(out)
    assert len(problems) > 15  # at least one plan per arrival
    assert all(p.idle for p in problems)  # the simulator plans only when a GPU is idle
    assert {q.id for p in problems for q in p.requests} == {f"r{i:06d}" for i in range(15)}
