"""The Gantt chart: drawn in one pass, legend off the bars, colours that identify, misses marked, nodes drawn."""
import time

import numpy as np
import pytest
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.colors import to_hex

from ditplan.models.catalog import Shape
from ditplan.models.cost import CostModel
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.plots import OUTCOME_COLORS, gantt_bars, gantt_figure, plot_gantt
from ditplan.planner.request import Request, RequestState, RequestStatus, Stage
from ditplan.planner.execution import Segment
from ditplan.planner.sim_result import SimResult
from ditplan.planner.simulator import SimConfig
from ditplan.planner.whatif import run_policies, to_requests
from ditplan.planner.workloads import generate


def _run(cluster: str, n: int, workload: str = "genserve-mixed", slo_scale: float = 1.2, policy: str = "edf",
         rate: float | None = None):
    c = parse_cluster(cluster)
    cost = CostModel(c.kind)
    reqs = to_requests(generate(workload, n=n, rate=rate, seed=4), cost, c, slo_scale)
    return c, run_policies(reqs, c, cost, [policy], SimConfig(seed=4))[policy].result


@pytest.fixture(scope="module")
def l20():
    """edf on 2x4xL20, images and videos, a tight SLO: some requests miss."""
    return _run("2x4xL20", 40)


def _artists(ax) -> int:
    return len(ax.collections) + len(ax.lines) + len(ax.patches) + len(ax.texts)


def _layer(ax, key):
    return next((c for c in ax.collections if c.get_gid() == f"gantt-{key}"), None)


def _synthetic(n_req: int, n_gpus: int = 16) -> SimResult:
    """``n_req`` requests, each encode -> 2 diffuse pieces on 2 GPUs -> decode, back to back per GPU pair."""
    statuses, segments = [], []
    pairs = n_gpus // 2
    t = [0.0] * pairs
    for i in range(n_req):
        side = (256, 512, 1024, 2048)[i % 4]
        req = Request(f"r{i}", "flux-dev", Shape(side, side), 28, arrival=float(i), deadline=float(i) + 30.0)
        st = RequestStatus(req)
        p = i % pairs
        gpus = (2 * p, 2 * p + 1)
        start = max(t[p], float(i))
        segments.append(Segment((req.id,), Stage.ENCODE, gpus[:1], 0, start, start + 0.2))
        segments.append(Segment((req.id,), Stage.DIFFUSE, gpus, 14, start + 0.2, start + 5.0))
        segments.append(Segment((req.id,), Stage.DIFFUSE, gpus, 14, start + 5.0, start + 9.8))
        segments.append(Segment((req.id,), Stage.DECODE, gpus[:1], 0, start + 9.8, start + 10.0))
        t[p] = start + 10.0
        st.state, st.finish = RequestState.DONE, start + 10.0
        statuses.append(st)
    return SimResult("synthetic", statuses, segments, [], 0, 0, max(t))


def test_gantt_draws_a_constant_number_of_artists_not_one_per_segment(l20):
    cluster, result = l20
    big_cluster, big = _run("2x4xL20", 160)
    counts = []
    for c, r in ((cluster, result), (big_cluster, big)):
        fig, ax = gantt_figure(r, c)
        polys = sum(len(coll.get_paths()) for coll in ax.collections if isinstance(coll, PolyCollection))
        loads = sum(1 for e in r.weight_events if e.kind == "load" and e.end > e.start)
        assert polys == gantt_bars(r) + loads  # every bar drawn, in a handful of collections
        counts.append(_artists(ax))
        fig.clf()
    assert gantt_bars(big) > 3 * gantt_bars(result) > 300
    assert counts[0] == counts[1] <= 12  # 5 bar layers, the misses, the node line, 2 node labels


def test_twenty_thousand_bars_draw_in_seconds(tmp_path):
    result = _synthetic(10_000)  # 40,000 segments, 60,000 bars
    assert gantt_bars(result) == 60_000
    t0 = time.perf_counter()
    path = plot_gantt(result, 16, tmp_path / "g.png")
    took = time.perf_counter() - t0
    assert path.stat().st_size > 5000
    assert took < 20, took  # one broken_barh per bar took minutes at this size


def test_the_legend_sits_outside_the_axes(l20):
    cluster, result = l20
    fig, ax = gantt_figure(result, cluster)
    fig.canvas.draw()
    (legend,) = fig.legends
    lb, ab, fb = legend.get_window_extent(), ax.get_window_extent(), fig.bbox
    assert not lb.overlaps(ab), (lb, ab)
    assert fb.x0 <= lb.x0 and lb.x1 <= fb.x1 and fb.y0 <= lb.y0 and lb.y1 <= fb.y1  # and inside the figure
    fig.clf()


def test_missed_requests_are_marked_where_they_finished(l20):
    cluster, result = l20
    missed = [s for s in result.requests if not s.met]
    assert 0 < len(missed) < len(result.requests)
    fig, ax = gantt_figure(result, cluster)
    (marks,) = [line for line in ax.lines if line.get_gid() == "gantt-missed"]
    last_end: dict[str, float] = {}
    for seg in result.segments:
        for rid in seg.request_ids:
            last_end[rid] = max(last_end.get(rid, 0.0), seg.end)
    want = sorted(s.finish if s.finish is not None else last_end[s.id] for s in missed if s.id in last_end)
    assert len(want) > 0 and sorted(marks.get_xdata()) == pytest.approx(want)
    assert not any(s.met and s.finish in set(marks.get_xdata()) for s in result.requests)
    assert f"missed deadline ({len(missed)} of {len(result.requests)}" in ax.get_title()
    fig.clf()


def test_outcome_colours_follow_met_and_late(l20):
    cluster, result = l20
    fig, ax = gantt_figure(result, cluster, color_by="outcome")
    status = {s.id: s for s in result.requests}
    want = []
    for seg in result.segments:
        if seg.stage is Stage.DIFFUSE and status[seg.request_ids[0]].request.kind == "image":
            s = status[seg.request_ids[0]]
            colour = OUTCOME_COLORS["on time" if s.met else "late" if s.state is RequestState.DONE else "unfinished"]
            want += [to_hex(colour)] * len(seg.gpus)
    got = [to_hex(c) for c in _layer(ax, "image").get_facecolors()]
    assert got == want and to_hex(OUTCOME_COLORS["late"]) in got and to_hex(OUTCOME_COLORS["on time"]) in got
    fig.clf()


def test_class_colours_identify_model_and_shape(l20):
    cluster, result = l20
    fig, ax = gantt_figure(result, cluster)
    status = {s.id: s for s in result.requests}
    by_class: dict[str, set] = {}
    colours = iter(np.concatenate([_layer(ax, k).get_facecolors() for k in ("image", "video") if _layer(ax, k)]))
    for kind in ("image", "video"):
        for seg in result.segments:
            req = status[seg.request_ids[0]].request
            if seg.stage is Stage.DIFFUSE and req.kind == kind:
                for _ in seg.gpus:
                    by_class.setdefault(f"{req.model} {req.shape}", set()).add(to_hex(next(colours)))
    assert len(by_class) >= 3  # SD3 images and CogVideoX videos of several lengths
    assert all(len(c) == 1 for c in by_class.values())  # one colour per class ...
    assert len({next(iter(c)) for c in by_class.values()}) == len(by_class)  # ... and no two classes share one
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert set(by_class) <= labels
    fig.clf()


def test_node_boundaries_on_a_two_node_cluster(l20):
    cluster, result = l20
    fig, ax = gantt_figure(result, cluster)
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection) and c.get_gid() == "gantt-nodes"]
    ys = [seg[0][1] for seg in lines.get_segments()]
    assert ys == [3.5]  # between GPU 3 (node 0) and GPU 4 (node 1)
    assert {t.get_text() for t in ax.texts} == {"node 0", "node 1"}
    fig.clf()
    fig, ax = gantt_figure(result, 8)  # a GPU count only: one node, no boundary
    assert not [c for c in ax.collections if c.get_gid() == "gantt-nodes"] and not ax.texts
    fig.clf()


def test_encode_and_decode_stay_visible_at_long_time_scales():
    result = _synthetic(3000)  # ~3,000 s of 0.2 s encodes and decodes: a tenth of a pixel each
    fig, ax = gantt_figure(result, 16)
    fig.canvas.draw()
    span = ax.get_xlim()[1] - ax.get_xlim()[0]
    px_per_s = ax.get_window_extent().width / span
    assert 0.2 * px_per_s < 0.3  # really too short to see at true width
    for key in ("encode", "decode"):
        coll = _layer(ax, key)
        widths = np.array([np.ptp(p.vertices[:, 0]) for p in coll.get_paths()])
        assert len(widths) == 3000
        assert (widths * px_per_s >= 1.0).all()  # at least a pixel wide (MIN_STAGE_PX = 1.5 aimed)
        heights = np.array([np.ptp(p.vertices[:, 1]) for p in coll.get_paths()])
        assert (heights < 0.5).all()  # widened ones keep to the row's lower third: diffuse bars still show
    fig.clf()
    # At a short time scale they are drawn as they are, full height.
    fig, ax = gantt_figure(_synthetic(8), 16)
    widths = [np.ptp(p.vertices[:, 0]) for p in _layer(ax, "encode").get_paths()]
    heights = [np.ptp(p.vertices[:, 1]) for p in _layer(ax, "encode").get_paths()]
    assert widths == pytest.approx([0.2] * 8) and heights == pytest.approx([0.8] * 8)
    fig.clf()


def test_unknown_colouring_is_refused(l20):
    with pytest.raises(ValueError, match="'rainbow'"):
        gantt_figure(l20[1], l20[0], color_by="rainbow")
