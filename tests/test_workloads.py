"""Built-in workloads: determinism, distributions, arrival processes, validation."""
from __future__ import annotations

import numpy as np
import pytest

from ditplan.models.catalog import CATALOG
from ditplan.planner.errors import InputError
from ditplan.planner.traces import read_trace, write_trace
from ditplan.planner.workloads import WORKLOADS, arrival_times, generate


def gaps(recs) -> np.ndarray:
    return np.diff([r.arrival for r in recs])


def cv(x: np.ndarray) -> float:
    return float(np.std(x) / np.mean(x))


# --- contract of every workload ---------------------------------------------------

@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_records_are_valid_and_round_trip(tmp_path, name):
    recs = generate(name, n=300, seed=3)
    assert len(recs) == 300
    assert [r.id for r in recs] == [f"r{i:06d}" for i in range(300)]
    assert recs[0].arrival == 0.0
    assert all(a.arrival <= b.arrival for a, b in zip(recs, recs[1:]))
    assert all(r.deadline is None and r.slo_scale is None for r in recs)
    for r in recs:
        assert type(r.height) is int and type(r.frames) is int and type(r.arrival) is float
        assert r.model in CATALOG
    p = tmp_path / "w.jsonl"
    write_trace(p, recs)  # passes the reader's validation and reads back identical
    assert read_trace(p) == recs


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_deterministic_per_seed(name):
    assert generate(name, n=100, seed=11) == generate(name, n=100, seed=11)
    assert generate(name, n=100, seed=11) != generate(name, n=100, seed=12)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_defaults_used_when_not_given(name):
    w = WORKLOADS[name]
    assert generate(name) == w.generate(w.default_n, w.default_rate, 0)
    assert len(generate(name)) == w.default_n
    assert w.description and "\n" not in w.description


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_rate_sweep_keeps_mix_and_scales_arrivals(name):
    slow, fast = generate(name, n=200, rate=1.0, seed=5), generate(name, n=200, rate=2.0, seed=5)
    assert [(r.model, r.height, r.frames) for r in slow] == [(r.model, r.height, r.frames) for r in fast]
    assert np.allclose([2 * r.arrival for r in fast], [r.arrival for r in slow], atol=2e-6)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_mean_rate_within_10_percent(name):
    rate = 3.0
    recs = generate(name, n=4000, rate=rate, seed=1)
    measured = (len(recs) - 1) / recs[-1].arrival
    assert measured == pytest.approx(rate, rel=0.10)


def test_default_load_is_moderate_on_8xh100():
    """Defaults put 40-80% of 8 H100s' GPU-seconds to work (each request at SP 1)."""
    from ditplan.models.cost import CostModel

    cost = CostModel("H100")
    for w in WORKLOADS.values():
        recs = w.generate(n=2000, seed=0)
        per_req = np.mean([cost.ideal_latency(CATALOG[r.model], r.shape, r.steps, max_sp=1) for r in recs])
        load = per_req * w.default_rate / 8
        assert 0.4 < load < 0.8, (w.name, load)


# --- TetriServe -----------------------------------------------------------------

def test_tetriserve_uniform_resolutions():
    recs = generate("tetriserve-uniform", n=4000, seed=2)
    assert {(r.model, r.steps, r.frames) for r in recs} == {("flux-dev", 28, 1)}
    assert all(r.height == r.width for r in recs)
    sides, counts = np.unique([r.height for r in recs], return_counts=True)
    assert sides.tolist() == [256, 512, 1024, 2048]
    assert np.all(np.abs(counts / 4000 - 0.25) < 0.03)


def test_tetriserve_skewed_probabilities_and_mean():
    n = 4000
    uni = generate("tetriserve-uniform", n=n, seed=2)
    skew = generate("tetriserve-skewed", n=n, seed=2)
    mean_uni, mean_skew = np.mean([r.height for r in uni]), np.mean([r.height for r in skew])
    assert mean_uni == pytest.approx(960, rel=0.05)  # (256+512+1024+2048)/4
    sides = np.array([256, 512, 1024, 2048])
    p = np.exp(sides / 2048) / np.exp(sides / 2048).sum()  # alpha = 1
    assert mean_skew == pytest.approx(float(p @ sides), rel=0.05)  # ~1153 px
    assert mean_skew > mean_uni + 100
    share_2048 = np.mean([r.height == 2048 for r in skew])
    assert share_2048 == pytest.approx(p[-1], abs=0.03)  # ~0.40


def test_tetriserve_skewed_alpha_option():
    mean = lambda a: np.mean([r.height for r in generate("tetriserve-skewed", n=3000, seed=4, alpha=a)])
    assert mean(-3.0) < mean(0.0) < mean(1.0) < mean(3.0)
    zero = generate("tetriserve-skewed", n=3000, seed=4, alpha=0.0)
    assert mean(0.0) == pytest.approx(960, rel=0.05) and len(zero) == 3000


# --- GenServe ----------------------------------------------------------------------

def test_genserve_mix_and_video_share():
    recs = generate("genserve-mixed", n=2000, seed=7, video_share=0.3)
    videos = [r for r in recs if r.frames > 1]
    images = [r for r in recs if r.frames == 1]
    assert len(videos) / 2000 == pytest.approx(0.3, abs=0.03)
    assert {(r.model, r.height, r.width, r.steps) for r in images} == {("sd3-medium", 1024, 1024, 28)}
    assert {(r.model, r.height, r.width, r.steps) for r in videos} == {("cogvideox-5b", 480, 720, 50)}
    frames, counts = np.unique([r.frames for r in videos], return_counts=True)
    assert frames.tolist() == [17, 33, 49]
    assert np.all(np.abs(counts / len(videos) - 1 / 3) < 0.06)


@pytest.mark.parametrize("share", [0.0, 0.7, 1.0])
def test_genserve_video_share_option(share):
    recs = generate("genserve-mixed", n=2000, seed=8, video_share=share)
    assert np.mean([r.frames > 1 for r in recs]) == pytest.approx(share, abs=0.03)


def test_genserve_bursty_vs_poisson_cv_and_rate():
    pois = generate("genserve-mixed", n=5000, rate=1.0, seed=9)
    burst = generate("genserve-mixed", n=5000, rate=1.0, seed=9, arrival="bursty")
    assert cv(gaps(pois)) == pytest.approx(1.0, abs=0.1)
    assert cv(gaps(burst)) > 2.0
    for recs in (pois, burst):
        assert (len(recs) - 1) / recs[-1].arrival == pytest.approx(1.0, rel=0.10)
    # same mix, only the arrival process differs
    assert [r.frames for r in pois] == [r.frames for r in burst]


def test_bursty_cv_option_follows():
    rng = lambda: np.random.default_rng(0)
    for target in (2.0, 4.0):
        t = arrival_times(rng(), 50_000, 2.0, "bursty", cv=target)
        assert cv(np.diff(t)) == pytest.approx(target, rel=0.2)
        assert np.mean(np.diff(t)) == pytest.approx(0.5, rel=0.1)


def test_bursty_available_on_every_workload():
    for name in WORKLOADS:
        recs = generate(name, n=3000, seed=1, arrival="bursty", cv=3.0)
        assert cv(gaps(recs)) > 2.0


# --- PatchedServe -----------------------------------------------------------------

def test_patchedserve_resolutions():
    recs = generate("patchedserve-mixed", n=3000, seed=2)
    assert {(r.model, r.steps, r.frames) for r in recs} == {("sd3-medium", 28, 1)}
    sides, counts = np.unique([r.height for r in recs], return_counts=True)
    assert sides.tolist() == [512, 768, 1024]
    assert np.all(np.abs(counts / 3000 - 1 / 3) < 0.03)
    assert all(r.height == r.width for r in recs)


# --- validation -------------------------------------------------------------------

def test_unknown_workload_lists_known():
    with pytest.raises(InputError, match="unknown workload 'tetris'.*genserve-mixed.*tetriserve-uniform"):
        generate("tetris")


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must be"),
    (dict(n=-5), "n must be"),
    (dict(n=2.5), "n must be"),
    (dict(rate=0), "rate must be"),
    (dict(rate=-1.0), "rate must be"),
    (dict(rate=float("inf")), "rate must be"),
    (dict(rate=float("nan")), "rate must be"),
    (dict(seed=-1), "seed must be"),
    (dict(video_share=1.5), "video_share"),
    (dict(video_share=-0.1), "video_share"),
    (dict(arrival="uniform"), "arrival must be one of poisson, bursty"),
    (dict(arrival="bursty", cv=0), "cv must be"),
    (dict(alpha=1.0), "no option 'alpha'"),
])
def test_bad_values(kwargs, match):
    with pytest.raises(InputError, match=match):
        generate("genserve-mixed", **kwargs)


def test_bad_alpha():
    with pytest.raises(InputError, match="alpha"):
        generate("tetriserve-skewed", alpha=float("nan"))
