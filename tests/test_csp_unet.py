"""The patched (CSP) U-Net forward against diffusers' own per-request forward, on the tiny SDXL U-Net
(models/torch/families.py SDXL.tiny_config, seeded weights): a batch of requests at different latent sizes
and timesteps, each cut into several patches.

Tolerances: float32 max abs error <= 1e-5 and relative L2 error <= 1e-5 (the outputs are O(1); what is left
is rounding: the per-image group norm and attention sum in another order); float64 relative L2 <= 1e-12
(the patched forward is exact, not approximate). Without the halo the relative error must exceed 0.1.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditplan.models.torch import tiny_config, tiny_transformer
from ditplan.models.torch.csp_unet import PatchedUNet, PatchLayout, group_norm, stitch_halo

SIZES = [(16, 16), (24, 24), (16, 24)]  # latent pixels: 4, 9 and 6 patches of 8
TIMESTEPS = [999.0, 500.0, 21.0]
F32_ABS, F32_REL, F64_REL, NO_HALO_REL = 1e-5, 1e-5, 1e-12, 0.1


@pytest.fixture(scope="module")
def unet():
    return tiny_transformer("sdxl")


def requests(dtype=torch.float32, sizes=SIZES):
    g = torch.Generator().manual_seed(1)
    r = len(sizes)
    latents = [torch.randn(1, 4, h, w, generator=g, dtype=dtype) for h, w in sizes]
    text = torch.randn(r, 8, 48, generator=g, dtype=dtype)
    pooled = torch.randn(r, 32, generator=g, dtype=dtype)
    time_ids = torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w] for h, w in sizes], dtype=dtype)
    return latents, torch.tensor(TIMESTEPS[:r], dtype=dtype), text, {"text_embeds": pooled, "time_ids": time_ids}


def unpatched(unet, latents, timesteps, text, added):
    return [unet(x, timesteps[r:r + 1], encoder_hidden_states=text[r:r + 1],
                 added_cond_kwargs={k: v[r:r + 1] for k, v in added.items()}).sample for r, x in enumerate(latents)]


def errors(out, ref) -> list[tuple[float, float]]:
    return [((a - b).abs().max().item(), ((a - b).norm() / b.norm()).item()) for a, b in zip(out, ref)]


@torch.no_grad()
@pytest.mark.parametrize("patch", [8, 4])
def test_patched_batch_matches_each_request_alone(unet, patch):
    batch = requests()
    ref = unpatched(unet, *batch)
    exact = errors(PatchedUNet(unet)(*batch, patch=patch), ref)
    naive = errors(PatchedUNet(unet, halo=False)(*batch, patch=patch), ref)
    for (h, w), (abs_err, rel), (_, naive_rel) in zip(SIZES, exact, naive):
        print(f"patch {patch} {h}x{w}: halo max abs {abs_err:.2e} rel L2 {rel:.2e}; no halo rel L2 {naive_rel:.3f}")
        assert abs_err <= F32_ABS and rel <= F32_REL
        assert naive_rel > NO_HALO_REL  # the halo is what makes it exact


@torch.no_grad()
def test_exact_in_float64(unet):
    unet64 = tiny_transformer("sdxl").double()
    batch = requests(torch.float64)
    rel = [r for _, r in errors(PatchedUNet(unet64)(*batch, patch=8), unpatched(unet64, *batch))]
    print("float64 rel L2:", " ".join(f"{r:.1e}" for r in rel))
    assert max(rel) <= F64_REL


def test_halo_is_the_zero_padded_image():
    layout = PatchLayout.build([(12, 8), (4, 4), (8, 16)], patch=4)
    g = torch.Generator().manual_seed(2)
    images = [torch.randn(1, 3, h, w, generator=g) for h, w in layout.sizes]
    halo = stitch_halo(layout.patchify(images), layout)
    windows = torch.cat([F.pad(x, (1, 1, 1, 1)).unfold(2, 6, 4).unfold(3, 6, 4).permute(0, 2, 3, 1, 4, 5)
                         .reshape(-1, 3, 6, 6) for x in images])
    assert torch.equal(halo, windows)
    assert layout.grids == ((3, 2), (1, 1), (2, 4)) and layout.offsets == (0, 6, 7, 15)
    assert layout.patch_request.tolist() == [0] * 6 + [1] + [2] * 8
    assert layout.patch_row[7:].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.patch_col[7:].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(layout.unpatchify(layout.patchify(images)), images))


def test_group_norm_statistics_are_per_image():
    layout = PatchLayout.build([(8, 8), (8, 16)], patch=4)
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(1, 8, h, w, generator=g) * (1 + 3 * r) + r for r, (h, w) in enumerate(layout.sizes)]
    norm = torch.nn.GroupNorm(2, 8)
    torch.nn.init.normal_(norm.weight, generator=g)
    torch.nn.init.normal_(norm.bias, generator=g)
    with torch.no_grad():
        out = layout.unpatchify(group_norm(layout.patchify(images), norm, layout))
        for a, x in zip(out, images):
            assert (a - norm(x)).abs().max().item() <= 1e-5


def test_sizes_off_the_patch_grid_are_refused(unet):
    with pytest.raises(ValueError, match=r"request 1: latent size 16x20 .* patch size 8"):
        PatchedUNet(unet).layout([(16, 16), (16, 20)], patch=8)
    with pytest.raises(ValueError, match=r"patch 5 is not divisible by 2\*\*1"):
        PatchedUNet(unet).layout([(10, 10)], patch=5)
    latents, timesteps, text, added = requests()
    with pytest.raises(ValueError, match=r"timesteps: 2 rows for 3 requests"):
        PatchedUNet(unet)(latents, timesteps[:2], text, added, patch=8)


def test_unsupported_unet_is_refused():
    import diffusers
    unet = diffusers.UNet2DConditionModel(**{**tiny_config("sdxl"), "use_linear_projection": False})
    with pytest.raises(ValueError, match=r"use_linear_projection=False is not supported"):
        PatchedUNet(unet)


def test_patch_for_a_batch_is_the_largest_common_side_up_to_32(unet):
    patched = PatchedUNet(unet)  # one downsampler: patches of an even side
    assert patched.patch_for([(8, 8), (16, 16)]) == 8  # the tiny models' latents
    assert patched.patch_for([(16, 16), (32, 48)]) == 16
    assert patched.patch_for([(8, 16), (12, 12)]) == 4
    assert patched.patch_for([(128, 128), (96, 128)]) == 32  # 1024 and 768x1024 px through an 8x VAE
    assert patched.patch_for([(104, 152), (128, 128)]) == 8  # 832x1216 px
    assert patched.patch_for([(64, 64)], largest=16) == 16
    with pytest.raises(ValueError, match=r"request 1: latent size 9x9 is not a positive multiple of 2"):
        patched.patch_for([(8, 8), (9, 9)])


# --- the Worker ----------------------------------------------------------------------------------------------
# A Worker's CSP batch of SDXL requests (EulerDiscrete, each member its own sigma for scale_model_input and its
# own scheduler step) against each request run alone with the stock forward. Tolerance: atol = rtol = 1e-5 on
# the latents after 4 steps (measured: at most 1.9e-6 absolute; the latents start at sigma_max ~ 14.6).
WORKER_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A one-rank gloo world for the Worker's process groups."""
    import torch.distributed as dist
    init = tmp_path_factory.mktemp("csp-unet-world") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sdxl_worker(unet):
    from ditplan.executor.runtime import Worker
    return Worker(0, 1, modules={("sdxl", "backbone"): unet})  # nothing mutates the module: shared


def sdxl_specs(sizes, steps=4):
    from ditplan.models.torch import LatentSpec
    return [LatentSpec(f"r{h}x{w}", "sdxl", h, w, steps, seed=i) for i, (h, w) in enumerate(sizes)]


def run_worker(unet, specs, runs):
    """Encode ``specs`` on a fresh Worker, then ``runs`` (request indices, steps) in order; the final latents."""
    w = sdxl_worker(unet)
    w.handle({"op": "encode", "specs": specs, "rank": 0})
    rids = [s.rid for s in specs]
    for members, steps in runs:
        w.handle({"op": "run", "rids": [rids[i] for i in members], "steps": steps})
    return w, [w.handle({"op": "fetch", "rid": r})["latent"] for r in rids]


def test_worker_runs_a_mixed_sdxl_batch_at_different_steps_as_each_request_alone(world, unet):
    specs = sdxl_specs([(8, 16), (12, 12), (16, 16)])  # patch 4: 8, 9 and 16 patches
    _, ref = run_worker(unet, specs, [([0], 4), ([1], 4), ([2], 4)])
    # r8x16 two steps ahead, r12x12 one; then the three as one batch for r8x16's 2 steps left, then the rest
    w, got = run_worker(unet, specs, [([0], 2), ([1], 1), ([0, 1, 2], 4), ([1, 2], 4), ([2], 4)])
    assert [w.states[s.rid].step for s in specs] == [4, 4, 4]
    for g, r in zip(got, ref):
        print(f"{tuple(r.shape[-2:])}: max abs {(g - r).abs().max().item():.1e}, |latent| max {r.abs().max():.1f}")
        torch.testing.assert_close(g, r, **WORKER_TOL)
    _, moved = run_worker(unet, specs, [([0, 1, 2], 1), ([0, 1, 2], 3)])  # all at step 0: still mixed shapes
    for g, r in zip(moved, ref):
        torch.testing.assert_close(g, r, **WORKER_TOL)
    _, noise = run_worker(unet, specs, [([0, 1, 2], 0)])  # the initial latents: the 4 steps moved every one
    assert min((a - b).abs().max().item() for a, b in zip(ref, noise)) > 1.0


def test_worker_refuses_an_sdxl_batch_off_the_patch_grid_naming_the_size(world, unet):
    w = sdxl_worker(unet)
    specs = sdxl_specs([(8, 8), (10, 10), (9, 9)])
    w.handle({"op": "encode", "specs": specs, "rank": 0})
    with pytest.raises(ValueError, match=r"request 2: latent size 9x9 is not a positive multiple of 2"):
        w.handle({"op": "run", "rids": [s.rid for s in specs], "steps": 1})
    with pytest.raises(ValueError, match=r"sdxl has no sequence parallelism: a CSP batch of it runs at degree 1"):
        from ditplan.models.torch.csp import SeqShard, csp_predict
        csp_predict("sdxl", w.modules["sdxl", "backbone"], [], [], [], torch.zeros(0), SeqShard(None, 0, 2))
