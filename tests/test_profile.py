"""``ditplan profile`` on tiny models over 2 gloo ranks, and the profile it writes in what-if and serve."""
from __future__ import annotations

import json
import re

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


def test_profile_csp_measures_every_pair_and_all_shapes_at_each_degree_as_csp_rows():
    """sd3-medium (the catalog's CSP model), latents 8, 16 and 32 (``--downscale 32``), SP 1 and 2 on 2 gloo ranks:
    3 pairs and the whole mix at each degree, written as csp rows that parse back. The step times are a real
    step's: within 10x of the mix's slowest member alone (a no-op would be microseconds, a span with the encode
    in it tens of ms). Not asserted: that a mix is no faster than its slowest member alone. It does
    more work, but a member alone runs other code (the stock forward behind the Worker's SP hooks), and over three
    runs of this test the ratio mix / slowest member alone ranged 0.4-1.9 (steps of 1-10 ms on a shared 2-core
    CPU, medians of 3), so such a bound would only test the machine's load."""
    from ditplan.executor.profile import csp_mixes, make_job, measure, measurements
    from ditplan.models.profiles import CspPoint, parse_profile

    job = make_job("sd3-medium", "tiny", "256,512,1024", "1,2", "1", 2, warmup=1, repeats=3, downscale=32, csp=True)
    s256, s512, s1024 = (Shape(n, n) for n in (256, 512, 1024))
    mixes = [(s256, s512), (s256, s1024), (s512, s1024), (s256, s512, s1024)]
    assert list(csp_mixes(job.shapes)) == mixes and csp_mixes(job.shapes[:2]) == ((s256, s512),)
    seen = []
    prof = measure(job, seen.append)
    assert len(seen) == measurements(job) == 3 * 2 + 4 * 2 + 2 * 3
    assert [m.label for m in seen if m.what == "csp"][:2] == ["csp 256x256+512x512 sp1", "csp 256x256+1024x1024 sp1"]
    assert sorted((c.shapes, c.sp) for c in prof.csp) == sorted((m, k) for m in mixes for k in (1, 2))
    assert "CSP rows: the same per (mix of shapes" in prof.provenance["method"]
    back = parse_profile(json.loads(json.dumps(prof.to_doc())))
    assert back.csp == prof.csp and all(isinstance(c, CspPoint) for c in back.csp)
    alone = {(p.shape, p.sp): p.step_s for p in prof.points}
    for c in prof.csp:
        slowest = max(alone[s, c.sp] for s in c.shapes)
        print(f"{'+'.join(map(str, c.shapes))} sp{c.sp}: {c.step_s * 1e3:.2f} ms, slowest alone {slowest * 1e3:.2f} ms")
        assert c.model == "sd3-medium" and c.iqr_s is not None and slowest / 10 < c.step_s < 10 * slowest


def test_profile_cli_csp_flag_measures_csp_rows_and_refuses_a_single_shape(tmp_path):
    out = tmp_path / "sd3-csp.json"
    r = invoke("profile", "--model", "sd3-medium", "--shapes", "256,1024", "--warmup", 0, "--repeats", 1, "--csp",
               "--out", out)
    assert r.exit_code == 0, r.output
    assert "csp 256x256+1024x1024 sp1:" in r.output and "1 csp points" in r.output
    prof = load_profile(out)
    assert [(c.shapes, c.sp) for c in prof.csp] == [((Shape(256, 256), Shape(1024, 1024)), 1)]
    assert prof.provenance["command"].endswith("--csp --out " + str(out))
    r = invoke("profile", "--model", "sd3-medium", "--shapes", "256", "--csp", "--out", tmp_path / "p.json")
    assert r.exit_code == 2 and "--csp needs two or more distinct --shapes to mix" in r.output, r.output
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("args, message", [
    (("sd3-medium", "tiny", "256", "1", "1", 1), "--csp needs two or more distinct --shapes to mix, not '256'"),
    (("wan2.1-t2v-14b", "tiny", "480x832x9,480x832x17", "1", "1", 1),
     "--csp: wan2.1-t2v-14b's family 'wan' has no CSP forward in the executor (CSP families: flux, sd3, sdxl)"),
])
def test_profile_csp_refuses_what_cannot_carry_csp_rows(args, message):
    from ditplan.executor.profile import ProfileInputError, make_job

    with pytest.raises(ProfileInputError, match=re.escape(message)):
        make_job(*args, csp=True)


def test_profile_csp_follows_the_catalogs_csp_flag():
    """Every model of a family with a CSP forward: accepted where the catalog flags it (parse_profile then takes
    its csp rows), refused naming it where not."""
    from ditplan.executor.profile import ProfileInputError, make_job
    from ditplan.models.catalog import CATALOG
    from ditplan.models.torch.csp import CSP_FAMILIES

    models = sorted(m for m, spec in CATALOG.items() if spec.family in CSP_FAMILIES)
    assert "sd3-medium" in models and CATALOG["sd3-medium"].csp
    # The planner batches only families the executor has a CSP forward for, and every such family.
    assert {spec.family for spec in CATALOG.values() if spec.csp} == set(CSP_FAMILIES)
    for model in models:
        if CATALOG[model].csp:
            assert make_job(model, "tiny", "256,512", "1", "1", 1, csp=True).csp
        else:
            with pytest.raises(ProfileInputError, match=re.escape(f"--csp: {model} runs no CSP batches in the "
                                                                  "catalog (its csp flag is off)")):
                make_job(model, "tiny", "256,512", "1", "1", 1, csp=True)


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
