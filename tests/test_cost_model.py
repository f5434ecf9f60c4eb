import math

import pytest

from ditplan.models.catalog import CATALOG, Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.models.profiles import builtin_profiles, parse_profile, ProfileError


@pytest.fixture(scope="module")
def l20():
    return CostModel("L20")


@pytest.fixture(scope="module")
def h100():
    return CostModel("H100")


def test_reproduces_every_published_point(l20):
    points = builtin_profiles()[0].points
    assert len(points) == 4 * (6 + 3 + 6 + 6)
    for p in points:
        got = l20.step_time(get_model(p.model), p.shape, p.sp)
        assert got == pytest.approx(p.step_s, rel=1e-9), p


def test_interpolates_between_profiled_points_in_tokens(l20):
    flux = get_model("flux-dev")
    lo, hi = l20.step_time(flux, Shape(1024, 1024), 1), l20.step_time(flux, Shape(2048, 2048), 1)
    mid = l20.step_time(flux, Shape(1536, 1536), 1)
    assert lo < mid < hi
    # log-log interpolation: geometric position between the anchors
    t_lo, t_mid, t_hi = (flux.seq_tokens(Shape(s, s)) for s in (1024, 1536, 2048))
    w = math.log(t_mid / t_lo) / math.log(t_hi / t_lo)
    assert mid == pytest.approx(math.exp(math.log(lo) + w * math.log(hi / lo)), rel=1e-9)


def test_roofline_fit_error_is_bounded(l20):
    errs = []
    for p in builtin_profiles()[0].points:
        m = get_model(p.model)
        errs.append(abs(l20.roofline_step(m, p.shape, p.sp) - p.step_s) / p.step_s)
    errs.sort()
    assert errs[len(errs) // 2] < 0.15  # median relative error of the calibrated roofline
    assert max(errs) < 0.6


def test_other_gpu_kinds_scale_with_the_roofline(l20, h100):
    flux = get_model("flux-dev")
    s = Shape(2048, 2048)
    assert h100.step_time(flux, s, 1) < l20.step_time(flux, s, 1) / 3
    a40 = CostModel("A40")
    # A40 has more FLOP/s than L20 but less memory bandwidth: same ballpark.
    assert 0.5 < a40.step_time(flux, s, 1) / l20.step_time(flux, s, 1) < 1.2


def test_held_out_h100_points_within_a_factor_of_two(h100):
    val = [p for p in builtin_profiles(role=None) if p.role == "validation"][0]
    for p in val.points:
        ratio = h100.step_time(get_model(p.model), p.shape, p.sp) / p.step_s
        assert 0.5 < ratio < 2.0, (p, ratio)


def test_models_without_tables_get_estimates(h100):
    for name in ("sdxl", "wan2.1-t2v-14b"):
        m = get_model(name)
        times = [h100.step_time(m, m.default_shape, k) for k in m.sp_degrees()]
        assert all(t > 0 and math.isfinite(t) for t in times)
        assert times == sorted(times, reverse=True)  # more GPUs, faster (big shapes)


def test_sp_speeds_up_large_shapes_not_tiny_ones(l20):
    flux = get_model("flux-dev")
    big = [l20.step_time(flux, Shape(4096, 4096), k) for k in (1, 2, 4, 8)]
    assert big[0] / big[3] > 6
    tiny = [l20.step_time(flux, Shape(256, 256), k) for k in (1, 8)]
    assert tiny[0] / tiny[1] < 1.3


def test_batching_amortises_small_shapes(h100):
    sd3 = get_model("sd3-medium")
    one = h100.step_time(sd3, Shape(512, 512), 1, batch=1)
    four = h100.step_time(sd3, Shape(512, 512), 1, batch=4)
    assert one < four < 4 * one
    assert h100.max_batch(sd3, Shape(512, 512)) == 4  # 1024 tokens <= 16384
    assert h100.max_batch(sd3, Shape(2048, 2048)) == 4  # exactly 16384 tokens
    assert h100.max_batch(sd3, Shape(4096, 4096)) == 2
    assert h100.max_batch(sd3, Shape(8192, 8192)) == 1
    assert h100.max_batch(get_model("cogvideox-5b"), Shape(480, 720, 49)) == 1


def test_decode_does_not_speed_up_with_sp(h100):
    import inspect
    assert "sp" not in inspect.signature(h100.decode_time).parameters
    cog = get_model("cogvideox-5b")
    assert h100.decode_time(cog, Shape(480, 720, 49)) > h100.decode_time(get_model("sd3-medium"), Shape(1024, 1024))


def test_ideal_latency_uses_the_fastest_degree(h100):
    flux = get_model("flux-dev")
    s = Shape(2048, 2048)
    best = min(h100.step_time(flux, s, k) for k in (1, 2, 4, 8))
    assert h100.ideal_latency(flux, s, 28) == pytest.approx(
        h100.encode_time(flux, s) + 28 * best + h100.decode_time(flux, s))
    assert h100.ideal_latency(flux, s, 28, max_sp=1) > h100.ideal_latency(flux, s, 28)


def test_illegal_degree_is_refused(h100):
    with pytest.raises(ValueError, match="SP degree 2"):
        h100.step_time(get_model("sdxl"), Shape(1024, 1024), 2)


def test_token_math():
    flux, cog, hun = CATALOG["flux-dev"], CATALOG["cogvideox-5b"], CATALOG["hunyuanvideo"]
    assert flux.image_tokens(Shape(1024, 1024)) == 4096
    assert flux.seq_tokens(Shape(1024, 1024)) == 4096 + 512
    assert cog.latent_frames(Shape(768, 1360, 81)) == 21
    assert cog.image_tokens(Shape(768, 1360, 17)) == 5 * 48 * 85
    assert hun.latent_bytes(Shape(720, 1280, 129)) == 16 * 33 * 90 * 160 * 4
    assert flux.activation_bytes(Shape(1024, 1024), 4) < flux.activation_bytes(Shape(1024, 1024), 1)


def test_profile_validation_names_the_field():
    with pytest.raises(ProfileError, match=r"points\[0\].*'sp' = 3"):
        parse_profile({"gpu": "H100", "points": [{"model": "flux-dev", "height": 8, "width": 8, "sp": 3,
                                                   "step_s": 0.1}]})
    with pytest.raises(ProfileError, match="'gpu'"):
        parse_profile({"gpu": "TPU", "points": []})


def test_measured_profile_for_the_gpu_overrides_transfer():
    doc = {"gpu": "H100", "role": "profile", "points": [
        {"model": "flux-dev", "height": 1024, "width": 1024, "frames": 1, "sp": 1, "batch": 1, "step_s": 0.5}]}
    cm = CostModel("H100", builtin_profiles() + [parse_profile(doc)])
    assert cm.step_time(get_model("flux-dev"), Shape(1024, 1024), 1) == pytest.approx(0.5)
