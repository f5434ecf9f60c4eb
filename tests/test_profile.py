"""``ditplan profile`` on tiny models over 2 gloo ranks, and the profile it writes in what-if and serve."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.models.profiles import MEASURED_PROVENANCE, builtin_profiles, load_profile
from ditplan.planner.cli import app
from ditplan.planner.metrics import read_timeline
from ditplan.planner.service.server import PlannerServer, ServeConfig

pytest.importorskip("torch")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_profile_writes_a_profile_with_its_provenance_that_whatif_and_serve_plan_with(tmp_path):
    measured = tmp_path / "flux-tiny.json"
    r = invoke("profile", "--model", "flux-dev", "--model-scale", "tiny", "--shapes", "256", "--degrees", "1,2",
               "--batches", "1", "--devices", 2, "--warmup", 1, "--repeats", 3, "--out", measured)
    assert r.exit_code == 0, r.output
    prof = load_profile(measured)
    assert set(MEASURED_PROVENANCE) <= set(prof.provenance)
    prov = prof.provenance
    assert prov["model_scale"] == "tiny" and prov["device_type"] == "cpu" and prov["devices"] == 2
    assert prov["command"].startswith("ditplan profile --model flux-dev --model-scale tiny --shapes 256")
    import torch

    from ditplan.executor.profile import DECODE_IMPL, ENCODE_IMPL
    assert prov["torch"] == torch.__version__
    assert prof.gpu == "H100" and "filed under H100" in prov["gpu_filed_as"]  # CPU: the default cluster's kind
    assert sorted((p.shape, p.sp, p.batch) for p in prof.points) == [(Shape(256, 256), 1, 1), (Shape(256, 256), 2, 1)]
    assert all(p.step_s > 0 and p.iqr_s is not None for p in prof.points)
    assert sorted(s.stage for s in prof.stages) == ["decode", "encode"]
    assert {s.stage: s.stage_impl for s in prof.stages} == {"encode": ENCODE_IMPL, "decode": DECODE_IMPL}
    assert all(s.seconds > 0 for s in prof.stages)  # real text encoders and VAE ran
    assert json.loads(measured.read_text()) == prof.to_doc()  # written and read back alike

    step = {p.sp: p.step_s for p in prof.points}
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"id": "a", "arrival": 0.0, "model": "flux-dev", "height": 256, "width": 256,
                                 "frames": 1, "steps": 20, "slo_scale": 3.0}) + "\n")
    tl = tmp_path / "tl.jsonl"
    r = invoke("whatif", "--trace", trace, "--cluster", "2xH100", "--policy", "fcfs-sp2", "--profile", measured,
               "--timeline", tl, "--no-plot")
    assert r.exit_code == 0, r.output
    segments, _, _ = read_timeline(tl)
    [diffuse] = [s for s in segments if s["stage"] == "diffuse"]
    assert diffuse["end"] - diffuse["start"] == pytest.approx(20 * step[2], abs=2e-6)  # the timeline's rounding
    server = PlannerServer(ServeConfig(port=0, state_dir=str(tmp_path / "state"), policy="edf",
                                       cluster="2xH100", profiles=(str(measured),))).start()
    try:
        assert server.core.cost.step_time(get_model("flux-dev"), Shape(256, 256), 1) == pytest.approx(step[1])
    finally:
        server.stop(grace=0)
    assert CostModel("H100", builtin_profiles()).step_time(get_model("flux-dev"), Shape(256, 256), 1) != step[1]


@pytest.mark.parametrize("flags, message", [
    (["--shapes", "256,25x"], "--shapes: '25x' is not SIZE, HxW or HxWxF"),
    (["--shapes", "100"], "--shapes: 100x100 (height 100) must be a multiple of 16"),
    (["--degrees", "1,x"], "--degrees: 'x' is not a positive integer"),
    (["--degrees", "3"], "--degrees: 3 is not an SP degree of flux-dev"),
    (["--degrees", "4", "--devices", "2"], "--degrees: 4 needs 4 devices; --devices is 2"),
    (["--batches", "0"], "--batches: '0' is not a positive integer"),
    (["--model", "sdxl", "--degrees", "1,2"], "--degrees: 2 is not an SP degree of sdxl"),
    (["--model", "nope"], "--model 'nope' is unknown"),
    (["--model-scale", "full"], "--model-scale full needs --checkpoint PATH"),
    (["--model-scale", "huge"], "--model-scale 'huge' must be one of tiny, full"),
    (["--gpu", "TPU"], "--gpu 'TPU' is not one of"),
    (["--devices", "9"], "--devices 9 must be 1..8"),
])
def test_profile_refuses_bad_options_naming_the_flag_and_value(tmp_path, flags, message):
    args = {"--model": "flux-dev", "--shapes": "256", "--degrees": "1", "--devices": "1"}
    args.update(zip(flags[::2], flags[1::2]))
    r = invoke("profile", *[x for kv in args.items() for x in kv], "--out", tmp_path / "p.json")
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "p.json").exists()


def test_serve_refuses_a_missing_profile(tmp_path):
    r = invoke("serve", "--port", 0, "--state-dir", tmp_path / "s", "--profile", tmp_path / "missing.json")
    assert r.exit_code == 2 and "missing.json' does not exist" in r.output, r.output
    assert not (tmp_path / "s").exists()  # nothing opened
