"""Trace files: JSON Lines and Hetu-DiT import, validation, deadlines, writing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ditplan.models.catalog import CATALOG, Shape
from ditplan.planner.errors import InputError, TraceError
from ditplan.planner.request import Request
from ditplan.planner.traces import TraceRecord, read_trace, resolve_deadlines, write_trace

GOOD = {"id": "a", "arrival": 0.5, "model": "flux-dev", "height": 1024, "width": 1024,
        "frames": 1, "steps": 28}


def jsonl(tmp_path: Path, *lines: object, name: str = "t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


def line(**changes: object) -> dict:
    d = dict(GOOD)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return d


_DROP = object()


def bad(tmp_path: Path, lines: list, *, model: str | None = None, name: str = "t.jsonl") -> TraceError:
    p = jsonl(tmp_path, *lines, name=name)
    with pytest.raises(TraceError) as ei:
        read_trace(p, model=model)
    err = ei.value
    assert err.source == str(p)
    assert str(p) in str(err)
    return err


# --- JSON Lines: good files -------------------------------------------------------

def test_reads_valid_trace_sorted_by_arrival_then_line(tmp_path):
    p = jsonl(tmp_path,
              line(id="late", arrival=2.0),
              line(id="x", arrival=1.0, deadline=9.0),
              "",
              line(id="y", arrival=1.0, slo_scale=3),
              line(id="vid", arrival=0, model="cogvideox-5b", height=480, width=720, frames=49, steps=50))
    recs = read_trace(p)
    assert [r.id for r in recs] == ["vid", "x", "y", "late"]
    assert recs[0] == TraceRecord("vid", 0.0, "cogvideox-5b", 480, 720, 49, 50)
    assert isinstance(recs[0].arrival, float)
    assert recs[1].deadline == 9.0 and recs[1].slo_scale is None
    assert recs[2].slo_scale == 3.0 and isinstance(recs[2].slo_scale, float)
    assert recs[0].shape == Shape(480, 720, 49)


def test_null_optional_fields_mean_absent_and_prompt_is_ignored(tmp_path):
    p = jsonl(tmp_path, line(deadline=None, slo_scale=2.0, prompt="a cat"))
    (rec,) = read_trace(p)
    assert rec.deadline is None and rec.slo_scale == 2.0


def test_crlf_bom_and_blank_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    body = "\r\n".join([json.dumps(line(id="a")), "   ", json.dumps(line(id="b", arrival=1.0)), ""])
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [r.id for r in read_trace(p)] == ["a", "b"]


def test_model_argument_fills_lines_without_model(tmp_path):
    p = jsonl(tmp_path, line(model=_DROP), line(id="b", model="sd3-medium"))
    recs = read_trace(p, model="sdxl")
    assert [r.model for r in recs] == ["sdxl", "sd3-medium"]


# --- JSON Lines: every bad input names line, field and value -------------------------

@pytest.mark.parametrize("changes, field, value, reason", [
    (dict(id=_DROP), "id", None, "missing"),
    (dict(steps=_DROP), "steps", None, "missing"),
    (dict(frames=_DROP), "frames", None, "missing"),
    (dict(id=7), "id", 7, "string"),
    (dict(id=""), "id", "", "non-empty"),
    (dict(arrival="0.5"), "arrival", "0.5", "number"),
    (dict(arrival=True), "arrival", True, "number"),
    (dict(arrival=-0.1), "arrival", -0.1, ">= 0"),
    (dict(model=3), "model", 3, "string"),
    (dict(model="flux"), "model", "flux", "unknown model"),
    (dict(height=0), "height", 0, "positive"),
    (dict(width=-8), "width", -8, "positive"),
    (dict(height=1024.0), "height", 1024.0, "integer"),
    (dict(width="1024"), "width", "1024", "integer"),
    (dict(steps=0), "steps", 0, "positive"),
    (dict(steps=True), "steps", True, "integer"),
    (dict(frames=0), "frames", 0, ">= 1"),
    (dict(frames=17), "frames", 17, "image model"),
    (dict(deadline=5.0, slo_scale=2.0), "slo_scale", 2.0, "not both"),
    (dict(slo_scale=0), "slo_scale", 0, "positive"),
    (dict(slo_scale=-1.5), "slo_scale", -1.5, "positive"),
    (dict(slo_scale="2"), "slo_scale", "2", "number"),
    (dict(deadline=0.25), "deadline", 0.25, "after arrival"),
    (dict(deadline=0.5), "deadline", 0.5, "after arrival"),
    (dict(deadine=3.0), "deadine", 3.0, "unknown field"),
])
def test_bad_field_rejects_file_naming_line_field_value(tmp_path, changes, field, value, reason):
    err = bad(tmp_path, [line(id="ok", arrival=0.0), "", line(**changes)])
    assert err.line == 3
    assert (err.field, err.value) == (field, value)
    assert reason in err.reason
    assert f":3: field {field!r} = {value!r}" in str(err)


def test_unknown_model_lists_known_ones(tmp_path):
    err = bad(tmp_path, [line(model="stable-cascade")])
    for name in CATALOG:
        assert name in str(err)


def test_family_name_as_model_suggests_catalog_name(tmp_path):
    err = bad(tmp_path, [line(model="sd3")])
    assert "did you mean 'sd3-medium'?" in err.reason


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_rejected(tmp_path, token):
    text = json.dumps(line()).replace('"arrival": 0.5', f'"arrival": {token}')
    err = bad(tmp_path, [text])
    assert (err.line, err.field) == (1, "arrival")


def test_huge_integer_arrival_rejected(tmp_path):
    err = bad(tmp_path, [json.dumps(line()).replace("0.5", "1" + "0" * 400)])
    assert err.field == "arrival" and "finite" in err.reason


def test_invalid_json_names_line(tmp_path):
    err = bad(tmp_path, [line(), '{"id": "b", "arrival": 1.0,'])
    assert err.line == 2 and err.field is None
    assert "invalid JSON" in err.reason and "column" in err.reason


def test_non_object_json_rejected(tmp_path):
    err = bad(tmp_path, [line(), "[1, 2]"])
    assert err.line == 2 and "JSON object" in err.reason


def test_hetu_line_inside_jsonl_rejected(tmp_path):
    err = bad(tmp_path, [line(), "Request(request_id=1, timestamp=1.0)"])
    assert err.line == 2 and "invalid JSON" in err.reason


def test_duplicate_id_names_both_lines(tmp_path):
    err = bad(tmp_path, [line(id="a"), line(id="b"), line(id="a", arrival=3.0)])
    assert (err.line, err.field, err.value) == (3, "id", "a")
    assert "first on line 1" in err.reason


def test_error_in_late_line_rejects_whole_file(tmp_path):
    lines = [line(id=f"r{i}", arrival=float(i)) for i in range(50)] + [line(id="z", steps=-1)]
    assert bad(tmp_path, lines).line == 51


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_trace_is_an_error(tmp_path, content):
    p = tmp_path / "t.jsonl"
    p.write_text(content)
    with pytest.raises(TraceError, match="empty trace"):
        read_trace(p)


def test_unrecognised_format(tmp_path):
    err = bad(tmp_path, ["id,arrival,model", "a,0,flux-dev"])
    assert err.line == 1 and "neither JSON Lines nor Hetu-DiT" in err.reason


def test_not_utf8(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(json.dumps(line()).encode() + b"\n\xff\xfe\n")
    with pytest.raises(TraceError) as ei:
        read_trace(p)
    assert ei.value.line == 2 and "UTF-8" in ei.value.reason


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read trace"):
        read_trace(tmp_path / "nope.jsonl")


def test_unknown_model_argument(tmp_path):
    with pytest.raises(InputError, match="unknown model 'flux'.*flux-dev"):
        read_trace(jsonl(tmp_path, line()), model="flux")


# --- Hetu-DiT format ------------------------------------------------------------

HETU = [
    "Request(request_id=0, timestamp=0.0, height=256, width=256, num_frames=1, "
    "prompt='A futuristic cityscape', negative_prompt='low quality, blurry', num_inference_steps=28)",
    "Request(request_id=1, timestamp=0.666667, height=2048, width=2048, num_frames=1, "
    "prompt='A futuristic cityscape', negative_prompt='low quality, blurry', num_inference_steps=28)",
    "Request(request_id=2, timestamp=8.666671000000001, height=128, width=128, num_frames=1, "
    "prompt='x', negative_prompt='', num_inference_steps=28)",
]
HETU_VIDEO = ("Request(request_id=0, timestamp=0.0, height=768, width=1360, num_frames=65, "
              "prompt='A futuristic cityscape', negative_prompt='low quality, blurry', num_inference_steps=50)")


def test_hetu_with_model_argument(tmp_path):
    recs = read_trace(jsonl(tmp_path, *HETU, name="trace.txt"), model="sd3-medium")
    assert recs[0] == TraceRecord("0", 0.0, "sd3-medium", 256, 256, 1, 28)
    assert recs[2] == TraceRecord("2", 8.666671000000001, "sd3-medium", 128, 128, 1, 28)


@pytest.mark.parametrize("name, model, lines", [
    ("flux_trace.txt", "flux-dev", HETU),
    ("sd3_trace.txt", "sd3-medium", HETU),
    ("cogvideox_trace.txt", "cogvideox-5b", [HETU_VIDEO]),
    ("hunyuanvideo_trace.txt", "hunyuanvideo", [HETU_VIDEO]),
])
def test_hetu_model_from_family_prefixed_file_name(tmp_path, name, model, lines):
    recs = read_trace(jsonl(tmp_path, *lines, name=name))
    assert {r.model for r in recs} == {model}
    assert recs[0].frames == (65 if lines[0] is HETU_VIDEO else 1)


def test_hetu_model_argument_beats_file_name(tmp_path):
    recs = read_trace(jsonl(tmp_path, *HETU, name="flux_trace.txt"), model="sdxl")
    assert {r.model for r in recs} == {"sdxl"}


def test_hetu_without_model_refused_with_advice(tmp_path):
    err = bad(tmp_path, ["", *HETU], name="trace.txt")
    assert err.line == 2
    assert "--model" in err.reason and "flux_trace.txt" in err.reason and "flux-dev" in err.reason


def test_hetu_request_id_local_preferred(tmp_path):
    p = jsonl(tmp_path, HETU[0].replace("request_id=0", "request_id=0, request_id_local='u-7'"),
              name="flux.txt")
    assert read_trace(p)[0].id == "u-7"


@pytest.mark.parametrize("text, field, value, reason", [
    (HETU[1].replace("num_inference_steps=28", "num_inference_steps=0"), "num_inference_steps", 0, "positive"),
    (HETU[1].replace("timestamp=0.666667", "timestamp=-1.0"), "timestamp", -1.0, ">= 0"),
    (HETU[1].replace("num_frames=1", "num_frames=65"), "num_frames", 65, "image model"),
    (HETU[1].replace("height=2048, ", ""), "height", None, "missing"),
    (HETU[1].replace("width=2048", "width='2048'"), "width", "2048", "integer"),
    (HETU[1].replace("request_id=1", "request_id=0"), "request_id", "0", "duplicate id"),
    (HETU[1].replace("height=2048", "height=2048, height=1024"), "height", None, "twice"),
    (HETU[1].replace("height=2048", "height=h"), "height", "h", "literal"),
])
def test_hetu_bad_lines(tmp_path, text, field, value, reason):
    err = bad(tmp_path, [HETU[0], text], name="flux_trace.txt")
    assert (err.line, err.field, err.value) == (2, field, value)
    assert reason in err.reason


@pytest.mark.parametrize("text", ["Request(0, 0.0)", "Request(height=1", "Reqest(request_id=1)",
                                  "Request(**kw)"])
def test_hetu_malformed_lines(tmp_path, text):
    err = bad(tmp_path, [HETU[0], text], name="flux_trace.txt")
    assert err.line == 2 and err.field is None


# --- deadlines ---------------------------------------------------------------

def test_resolve_deadlines():
    recs = [TraceRecord("a", 1.0, "flux-dev", 512, 512, 1, 28),
            TraceRecord("b", 2.0, "flux-dev", 512, 512, 1, 20, slo_scale=2.0),
            TraceRecord("c", 3.0, "cogvideox-5b", 480, 720, 17, 50, deadline=100.0)]
    calls = []

    def ideal(model, shape, steps):
        calls.append((model, shape, steps))
        return 0.25 * steps

    reqs = resolve_deadlines(recs, ideal, default_slo_scale=5.0)
    assert reqs == [Request("a", "flux-dev", Shape(512, 512), 28, 1.0, 1.0 + 5.0 * 7.0),
                    Request("b", "flux-dev", Shape(512, 512), 20, 2.0, 2.0 + 2.0 * 5.0),
                    Request("c", "cogvideox-5b", Shape(480, 720, 17), 50, 3.0, 100.0)]
    assert calls == [("flux-dev", Shape(512, 512), 28), ("flux-dev", Shape(512, 512), 20)]


def test_resolve_deadlines_caches_equal_requests():
    recs = [TraceRecord(str(i), float(i), "sd3-medium", 1024, 1024, 1, 28) for i in range(10)]
    calls = []
    resolve_deadlines(recs, lambda *k: calls.append(k) or 1.0, 3.0)
    assert len(calls) == 1


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf")])
def test_resolve_deadlines_rejects_bad_default_scale(scale):
    with pytest.raises(InputError, match="SLO scale"):
        resolve_deadlines([], lambda *a: 1.0, scale)


def test_resolve_deadlines_with_cost_model():
    from ditplan.models.cost import CostModel
    from ditplan.planner.traces import ideal_latency_from

    cost = CostModel("H100")
    rec = TraceRecord("a", 0.0, "flux-dev", 1024, 1024, 1, 28)
    (req,) = resolve_deadlines([rec], ideal_latency_from(cost), 2.0)
    spec = CATALOG["flux-dev"]
    assert req.deadline == pytest.approx(2.0 * cost.ideal_latency(spec, Shape(1024, 1024), 28))


# --- writing ------------------------------------------------------------------

def test_write_fixed_key_order_and_rounding(tmp_path):
    p = tmp_path / "out.jsonl"
    write_trace(p, [TraceRecord("a", 0.1234567891, "flux-dev", 512, 512, 1, 28, deadline=3.0000004),
                    TraceRecord("b", 1.0, "cogvideox-5b", 480, 720, 49, 50, slo_scale=2.5),
                    TraceRecord("c", 2.0, "sdxl", 1024, 1024, 1, 30)])
    assert p.read_bytes() == (
        b'{"id": "a", "arrival": 0.123457, "model": "flux-dev", "height": 512, "width": 512, '
        b'"frames": 1, "steps": 28, "deadline": 3.0}\n'
        b'{"id": "b", "arrival": 1.0, "model": "cogvideox-5b", "height": 480, "width": 720, '
        b'"frames": 49, "steps": 50, "slo_scale": 2.5}\n'
        b'{"id": "c", "arrival": 2.0, "model": "sdxl", "height": 1024, "width": 1024, '
        b'"frames": 1, "steps": 30}\n')


def test_write_read_round_trip_exact_and_bytes_stable(tmp_path):
    recs = [TraceRecord("a", 0.0, "flux-dev", 256, 256, 1, 28),
            TraceRecord("b", 0.333333, "sd3-medium", 768, 768, 1, 28, slo_scale=4.0),
            TraceRecord("ü-é", 1.5, "hunyuanvideo", 720, 1280, 129, 50, deadline=400.123456)]
    p1, p2 = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    write_trace(p1, recs)
    assert read_trace(p1) == recs
    write_trace(p2, read_trace(p1))
    assert p1.read_bytes() == p2.read_bytes()


def test_hetu_import_then_write_is_jsonl(tmp_path):
    recs = read_trace(jsonl(tmp_path, *HETU, name="flux_trace.txt"))
    out = tmp_path / "out.jsonl"
    write_trace(out, recs)
    again = read_trace(out)
    assert [(r.id, r.model, r.height) for r in again] == [(r.id, r.model, r.height) for r in recs]
    assert again[2].arrival == 8.666671


_ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8).filter(str.strip)
_times = st.integers(0, 10**9).map(lambda k: k / 10**6)


@st.composite
def _records(draw):
    n = draw(st.integers(1, 8))
    ids = draw(st.lists(_ids, min_size=n, max_size=n, unique=True))
    out = []
    for rid in ids:
        model = draw(st.sampled_from(sorted(CATALOG)))
        spec = CATALOG[model]
        # Legal sizes only (the catalog's bounds): sides multiples of size_multiple, frames 1 + k x vae_temporal.
        frames = 1 if spec.kind == "image" else 1 + spec.vae_temporal * draw(
            st.integers(0, (spec.max_frames - 1) // spec.vae_temporal))
        m = spec.size_multiple
        height = m * draw(st.integers(1, spec.max_height // m))
        width = m * draw(st.integers(1, min(spec.max_width, spec.max_pixels // height) // m))
        arrival = draw(_times)
        extra = draw(st.sampled_from(["none", "deadline", "scale"]))
        deadline = arrival + draw(st.integers(1, 10**7)) / 10**6 if extra == "deadline" else None
        if deadline is not None:
            deadline = round(deadline, 6)
        scale = draw(st.integers(1, 10**7)) / 10**6 if extra == "scale" else None
        out.append(TraceRecord(rid, arrival, model, height, width, frames, draw(st.integers(1, 200)),
                               deadline, scale))
    return out


@settings(max_examples=60, deadline=None)
@given(_records())
def test_round_trip_property(tmp_path_factory, recs):
    p = tmp_path_factory.mktemp("rt") / "t.jsonl"
    write_trace(p, recs)
    assert read_trace(p) == sorted(recs, key=lambda r: r.arrival)


# --- bounds (the catalog's per-model limits, a deadline horizon) ------------------

@pytest.mark.parametrize("changes, field, value, needle", [
    (dict(height=2**62), "height", 2**62, "largest height, 2048"),
    (dict(height=10**6, width=10**6), "height", 10**6, "largest height, 2048"),
    (dict(width=7), "width", 7, "multiple of 16"),
    (dict(height=1000), "height", 1000, "multiple of 16"),
    (dict(steps=10**9), "steps", 10**9, "most steps, 1000"),
    (dict(deadline=1e308), "deadline", 1e308, "at most arrival + 86400"),
    (dict(model="cogvideox-5b", height=1360, width=1360, frames=49), "width", 1360, "largest frame"),
    (dict(model="cogvideox-5b", height=480, width=720, frames=97), "frames", 97, "largest frame count, 81"),
    (dict(model="hunyuanvideo", height=720, width=1280, frames=50), "frames", 50, "1 + a multiple of 4"),
])
def test_out_of_bounds_line_names_file_line_field_value_and_bound(tmp_path, changes, field, value, needle):
    err = bad(tmp_path, [line(id="ok"), line(id="b", **changes)])
    assert (err.line, err.field, err.value) == (2, field, value)
    assert needle in err.reason
    assert f"t.jsonl:2: field '{field}' = {value!r}" in str(err)


def test_hetu_line_out_of_bounds(tmp_path):
    err = bad(tmp_path, [HETU[0], HETU[1].replace("height=2048", "height=4096")], name="flux_trace.txt")
    assert (err.line, err.field, err.value) == (2, "height", 4096) and "2048" in err.reason


def test_bounds_admit_each_models_largest_request_and_horizon(tmp_path):
    lines = [line(id=m, model=m, height=s.max_height if s.kind == "image" else 768, width=1360 if s.kind == "video"
                  else s.max_width, frames=s.max_frames, steps=s.max_steps, deadline=0.5 + 86_400.0)
             for m, s in CATALOG.items()]
    assert len(read_trace(jsonl(tmp_path, *lines))) == len(CATALOG)
    # The horizon is the caller's: a shorter one refuses the same deadlines.
    with pytest.raises(TraceError, match="at most arrival \\+ 60"):
        read_trace(jsonl(tmp_path, *lines, name="u.jsonl"), horizon_s=60.0)


def test_resolved_deadline_past_the_horizon_is_refused():
    rec = TraceRecord("a", 0.0, "flux-dev", 1024, 1024, 1, 28, slo_scale=1e300, line=4)
    with pytest.raises(InputError, match="line 4: request 'a': field 'slo_scale' = 1e\\+300"):
        resolve_deadlines([rec], lambda *k: 10.0, 1.5)
    assert resolve_deadlines([rec], lambda *k: 10.0, 1.5, horizon_s=float("inf"))[0].deadline == 1e301


def test_every_workload_stays_within_the_bounds():
    from ditplan.planner.workloads import WORKLOADS

    for w in WORKLOADS.values():
        opts = {"videos": "cogvideox-5b,hunyuanvideo,wan2.1-t2v-14b"} if "videos" in w.options else {}
        for r in w.generate(n=300, seed=1, **opts):
            assert CATALOG[r.model].size_problem(r.height, r.width, r.frames, r.steps) is None, (w.name, r)


def test_a_request_round_trips_through_its_trace_record_and_the_file(tmp_path):
    reqs = [Request("a", "flux-dev", Shape(1024, 768, 1), 28, 0.5, 3.25),
            Request("v", "cogvideox-5b", Shape(480, 720, 49), 50, 1.0, 400.0)]
    path = tmp_path / "t.jsonl"
    write_trace(path, [TraceRecord.from_request(r) for r in reqs])
    back = resolve_deadlines(read_trace(path), lambda *_: 1.0, 1.5)
    assert back == reqs
    assert TraceRecord.from_request(reqs[0]).to_request(reqs[0].deadline) == reqs[0]
