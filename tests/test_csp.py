"""CSP batches (models/torch/csp.py) and the patch cache (models/torch/patch_cache.py) on tiny seeded SD3 and
FLUX backbones.

Tolerances (float32): a CSP batch against each request alone, atol = rtol = 1e-5 (measured: at most 5e-7, the
packed linear layers sum in another order); the patch cache at threshold 0 against no cache: bitwise.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ditplan.executor.launch import spawn_world
from ditplan.executor.runtime import Worker
from ditplan.models.torch import LatentSpec, ModelSource, family
from ditplan.models.torch.csp import CspLayout, SeqShard, csp_predict, sd3_forward
from ditplan.models.torch.patch_cache import CachePolicy, PatchCache, RequestCache, patch_ids

TOL = dict(atol=1e-5, rtol=1e-5)
SIDES = (8, 12, 16)  # latent sides: 16, 36 and 64 image tokens
TIMESTEPS = (1000.0, 750.0, 500.0)
CSP = ("sd3", "flux")


def tiny(fam: str = "sd3"):
    """SD3 with two blocks: a full joint block and the last, ``context_pre_only`` one (the executor's one-block tiny
    has only that); FLUX with two double- and two single-stream blocks."""
    import diffusers
    cfg = family(fam).tiny_config(4)
    cfg.update(num_layers=2) if fam == "sd3" else cfg.update(num_layers=2, num_single_layers=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(diffusers, family(fam).backbone)(**cfg).eval().requires_grad_(False)


def batch(fam: str = "sd3", sides=SIDES):
    f, text = family(fam), ModelSource().build(fam, "text")
    specs = [LatentSpec(f"r{s}", fam, s, s, 4, seed=i) for i, s in enumerate(sides)]
    conds = [f.encode(text, s, 2) for s in specs]
    latents = [f.noise(tiny(fam).config, s, torch.Generator().manual_seed(s.seed)) for s in specs]
    return specs, conds, latents


def alone(model, specs, conds, latents, timesteps):
    f = family(specs[0].family)
    with torch.no_grad():
        return [f.predict(model, s, x, c, torch.tensor(t)) for s, c, x, t in zip(specs, conds, latents, timesteps)]


def test_layout_offsets_owners_and_slots_with_padding():
    lay = CspLayout(((2, 2), (1, 3)), (2, 1), degree=2)  # 7 image tokens -> 8, 3 text tokens -> 4
    assert lay.img_offsets == (0, 4, 7) and lay.txt_offsets == (0, 2, 3)
    assert lay.img_owner.tolist() == [0, 0, 0, 0, 1, 1, 1, -1] and lay.txt_owner.tolist() == [0, 0, 1, -1]
    assert lay.local_img_owner(1).tolist() == [1, 1, 1, -1] and lay.local_txt_owner(0).tolist() == [0, 0]
    # after the all-to-all: rank 0's 4 image + 2 text tokens, then rank 1's
    assert lay.segments[0].tolist() == [0, 1, 2, 3, 4, 5] and lay.segments[1].tolist() == [6, 7, 8, 10]
    assert lay.slot_segment.tolist()[:11] == [0, 0, 0, 0, 0, 0, 1, 1, 1, -10, 1]
    flux = CspLayout(((2, 2), (1, 3)), (2, 1), degree=2, text_first=True)
    assert flux.segments[0].tolist() == [4, 5, 0, 1, 2, 3] and flux.segments[1].tolist() == [10, 6, 7, 8]
    with pytest.raises(ValueError, match="same length"):
        CspLayout(((2, 2),), (1, 2))


@pytest.mark.parametrize("attention", ["loop", "mask"])
@pytest.mark.parametrize("fam", CSP)
def test_csp_batch_of_three_resolutions_and_timesteps_equals_each_request_alone(fam, attention):
    model = tiny(fam)
    specs, conds, latents = batch(fam)
    ref = alone(model, specs, conds, latents, TIMESTEPS)
    with torch.no_grad():
        got = csp_predict(fam, model, specs, latents, conds, torch.tensor(TIMESTEPS), attention=attention)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, **TOL)
    # each image attends only to itself: the batch with another third image gives the same first two
    with torch.no_grad():
        other = csp_predict(fam, model, specs, latents[:2] + [torch.randn_like(latents[2])], conds,
                            torch.tensor(TIMESTEPS), attention=attention)
    torch.testing.assert_close(other[0], got[0], **TOL)
    assert not torch.allclose(other[2], got[2], atol=1e-3)


def test_csp_refuses_a_family_without_a_packed_forward_and_a_bad_attention():
    with pytest.raises(ValueError, match="'wan' has no CSP forward"):
        csp_predict("wan", None, [], [], [], torch.zeros(0))
    with pytest.raises(ValueError, match="attention must be one of loop, mask, flex, not 'dense'"):
        sd3_forward(tiny(), [], [], torch.zeros(0), attention="dense")
    specs, conds, latents = batch("flux", (8,))
    with pytest.raises(NotImplementedError, match="patch cache for FLUX"):
        csp_predict("flux", tiny("flux"), specs, latents, conds, torch.tensor([1.0]),
                    cache=PatchCache([RequestCache(CachePolicy(0.1, 1))]))


def _sp_world(rank, world, cases):
    shard = SeqShard(dist.group.WORLD, rank, world)
    out = []
    with torch.no_grad():
        for fam, sides, timesteps in cases:
            specs, conds, latents = batch(fam, sides)
            out.append(csp_predict(fam, tiny(fam), specs, latents, conds, torch.tensor(timesteps), shard))
    return out


def test_csp_batch_at_sp_degree_2_over_gloo_equals_each_request_alone():
    # the odd sizes: 89 SD3 image tokens (6x6 latent = 9 tokens), 9 + 16 + 4 = 29 FLUX ones: one pad each
    odd = (900.0, 100.0, 400.0)
    cases = [("sd3", SIDES, TIMESTEPS), ("sd3", (6, 8, 16), odd), ("flux", SIDES, TIMESTEPS), ("flux", (6, 8, 4), odd)]
    ranks = spawn_world(_sp_world, 2, cases, timeout=120)
    for (fam, sides, timesteps), got0, got1 in zip(cases, *ranks):
        specs, conds, latents = batch(fam, sides)
        for g0, g1, r in zip(got0, got1, alone(tiny(fam), specs, conds, latents, timesteps)):
            torch.testing.assert_close(g0, r, **TOL)
            assert torch.equal(g0, g1)  # every rank returns the whole prediction


# --- the Worker -----------------------------------------------------------------------------------------------
def worker(fam: str = "sd3", **kw) -> Worker:
    return Worker(0, 1, modules={(fam, "backbone"): tiny(fam)}, **kw)


def encoded(w: Worker, specs) -> None:
    w.handle({"op": "encode", "specs": list(specs), "rank": 0})


def latents_of(w: Worker, rids) -> list[torch.Tensor]:
    return [w.handle({"op": "fetch", "rid": r})["latent"] for r in rids]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A one-rank gloo world for the Worker's process groups, for this module's tests."""
    init = tmp_path_factory.mktemp("csp-world") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def specs_for(sides=SIDES, steps=4, fam="sd3"):
    return [LatentSpec(f"r{s}", fam, s, s, steps, seed=i) for i, s in enumerate(sides)]


@pytest.mark.parametrize("fam", CSP)
def test_worker_runs_a_mixed_batch_at_different_steps_as_each_request_alone(world, fam):
    specs = specs_for(fam=fam)
    solo = worker(fam)
    encoded(solo, specs)
    for s in specs:
        solo.handle({"op": "run", "rids": [s.rid], "steps": 4})
    ref = latents_of(solo, [s.rid for s in specs])

    w = worker(fam)
    encoded(w, specs)
    rids = [s.rid for s in specs]
    w.handle({"op": "run", "rids": rids[:1], "steps": 2})  # r8 is two steps ahead, r12 one
    w.handle({"op": "run", "rids": rids[1:2], "steps": 1})
    times = w.handle({"op": "run", "rids": rids, "steps": 4})  # the fewest left: r8's 2
    assert len(times) == 2 and [w.states[r].step for r in rids] == [4, 3, 2]
    w.handle({"op": "run", "rids": rids[1:], "steps": 4})  # r12 (1 left), r16 (2 left): 1 step
    w.handle({"op": "run", "rids": rids[2:], "steps": 4})
    for g, r in zip(latents_of(w, rids), ref):
        torch.testing.assert_close(g, r, **TOL)
    assert not torch.allclose(ref[0], latents_of(worker_noise(fam, specs[:1]), rids[:1])[0], atol=1e-2)


def _worker_sp_world(rank, world):
    """On a block of 2 ranks: r8 one step ahead, then all three as one CSP batch, then r12 and r16 alone."""
    out = {}
    for fam in CSP:
        w = Worker(rank, world, modules={(fam, "backbone"): tiny(fam)})
        specs = specs_for(fam=fam)
        rids = [s.rid for s in specs]
        encoded(w, specs)
        for rid in rids:
            w.handle({"op": "migrate", "rid": rid, "ranks": (0, 1)})
        w.handle({"op": "run", "rids": rids[:1], "steps": 1})
        w.handle({"op": "run", "rids": rids, "steps": 4})  # r8 has the fewest left: 3
        w.handle({"op": "run", "rids": rids[1:], "steps": 1})
        out[fam] = [w.states[r].step for r in rids], latents_of(w, rids) if rank == 0 else None
    return out


def test_worker_runs_a_mixed_batch_at_sp_degree_2_as_each_request_alone_on_one_rank(world):
    r0, r1 = spawn_world(_worker_sp_world, 2, timeout=120)
    for fam in CSP:
        solo = worker(fam)
        specs = specs_for(fam=fam)
        encoded(solo, specs)
        for s in specs:
            solo.handle({"op": "run", "rids": [s.rid], "steps": 4})
        steps, got = r0[fam]
        assert steps == r1[fam][0] == [4, 4, 4]
        for g, r in zip(got, latents_of(solo, [s.rid for s in specs])):
            torch.testing.assert_close(g, r, **TOL)


def worker_noise(fam, specs) -> Worker:
    """A Worker holding the requests' initial latents (zero steps run)."""
    w = worker(fam)
    encoded(w, specs)
    w.handle({"op": "run", "rids": [specs[0].rid], "steps": 0})
    return w


def test_worker_refuses_a_mixed_batch_of_a_family_without_csp_and_an_unknown_cache_class(world):
    w = Worker(0, 1, ModelSource())
    specs = [LatentSpec("a", "wan", 8, 8, 2, frames=5), LatentSpec("b", "wan", 12, 12, 2, frames=5)]
    encoded(w, specs)
    with pytest.raises(ValueError, match="wan has no CSP forward"):
        w.handle({"op": "run", "rids": ["a", "b"], "steps": 1})
    w = worker(cache_policies={"fast": CachePolicy(0.1, 2)})
    encoded(w, specs_for((8,)))
    with pytest.raises(ValueError, match="cache class 'turbo' of 'r8' is not one of the worker's cache_policies "
                                         r"\(fast\) or 'off'"):
        w.handle({"op": "run", "rids": ["r8"], "steps": 1, "cache": {"r8": "turbo"}})


# --- the patch cache -------------------------------------------------------------------------------------------
def cached_run(policy: CachePolicy, sides=SIDES, steps=6, everyone=False):
    """A full denoising run of a mixed batch with ``policy`` on every request but the middle one (``everyone``:
    on every request)."""
    specs = specs_for(sides, steps)
    w = worker(cache_policies={"c": policy})
    encoded(w, specs)
    rids = [s.rid for s in specs]
    cached = {r: "c" for i, r in enumerate(rids) if everyone or i != 1}
    w.handle({"op": "run", "rids": rids, "steps": steps, "cache": cached})
    return latents_of(w, rids), [w.states[r].cache for r in rids]


def test_patch_ids_cut_the_grid_into_squares_with_smaller_edges():
    assert patch_ids((3, 5), 2).tolist() == [0, 0, 1, 1, 2, 0, 0, 1, 1, 2, 3, 3, 4, 4, 5]


def test_cache_policy_refuses_bad_values():
    with pytest.raises(ValueError, match="threshold must be >= 0, not -0.1"):
        CachePolicy(-0.1, 2)
    with pytest.raises(ValueError, match="max_skips must be >= 0, not -1"):
        CachePolicy(0.1, -1)


def test_cache_at_threshold_zero_is_bitwise_the_uncached_run(world):
    ref, _ = cached_run(CachePolicy(0.0, 3, patch=2))
    specs = specs_for(SIDES, 6)
    w = worker()
    encoded(w, specs)
    w.handle({"op": "run", "rids": [s.rid for s in specs], "steps": 6})
    for g, r in zip(latents_of(w, [s.rid for s in specs]), ref):
        assert torch.equal(g, r)
    _, caches = cached_run(CachePolicy(0.0, 3, patch=2))
    # 2 blocks x 6 steps x (4 | 16 patches), none skipped; the middle request has no cache
    assert [(c.computed, c.skipped) for c in caches if c] == [(48, 0), (192, 0)] and caches[1] is None


def test_cache_forces_a_recompute_after_max_skips(world):
    # an infinite threshold skips whenever allowed: each patch runs 1 step in 3 (2 skips, then a recompute)
    _, caches = cached_run(CachePolicy(float("inf"), 2, patch=2))
    assert [(c.computed, c.skipped) for c in caches if c] == [(2 * 2 * 4, 2 * 4 * 4), (2 * 2 * 16, 2 * 4 * 16)]
    # every request cached: at steps where every patch is skipped only the text tokens are computed
    _, caches = cached_run(CachePolicy(float("inf"), 2, patch=2), everyone=True)
    assert [(c.computed, c.skipped) for c in caches] == [(16, 32), (2 * 2 * 9, 2 * 4 * 9), (64, 128)]
    # max_skips = 0: never skipped, whatever the threshold: the uncached result bit for bit
    got, caches = cached_run(CachePolicy(float("inf"), 0, patch=2))
    ref, _ = cached_run(CachePolicy(0.0, 0, patch=2))
    assert all(torch.equal(g, r) for g, r in zip(got, ref)) and caches[0].skipped == 0


def test_a_cached_request_carries_its_cache_into_its_next_run_and_another_batch(world):
    """6 steps in one run, against 3 + 3 in two runs (bit for bit: the cache's state lives with the request, not
    the run), and against 3 steps batched with another request and 3 alone (the packed linear layers round
    differently: TOL), with the same counts of patch-blocks skipped."""
    policy = {"c": CachePolicy(0.1, 2, patch=2)}
    specs = specs_for((8, 12), steps=6)
    runs = {"one": [(["r8"], 6)], "two": [(["r8"], 3), (["r8"], 3)], "batched": [(["r8", "r12"], 3), (["r8"], 3)]}
    got = {}
    for name, commands in runs.items():
        w = worker(cache_policies=policy)
        encoded(w, specs)
        for rids, steps in commands:
            w.handle({"op": "run", "rids": rids, "steps": steps, "cache": {"r8": "c"}})
        got[name] = w.states["r8"]
    one = got["one"]
    assert one.cache.skipped > 0 and torch.equal(got["two"].latent, one.latent)
    torch.testing.assert_close(got["batched"].latent, one.latent, **TOL)
    for name in ("two", "batched"):
        assert (got[name].cache.computed, got[name].cache.skipped) == (one.cache.computed, one.cache.skipped)


def test_skipped_patches_whose_input_did_not_change_give_the_uncached_output():
    """The same inputs three times: at calls 2 and 3 every patch is skipped (cached outputs, keys and values,
    only text tokens computed), which must reproduce the uncached forward; then one patch changes."""
    model = tiny()
    specs, conds, latents = batch()
    ts = torch.tensor(TIMESTEPS)
    caches = [RequestCache(CachePolicy(1e-6, 5, patch=2)) for _ in specs]
    with torch.no_grad():
        ref = sd3_forward(model, latents, conds, ts)
        for call in range(3):
            got = sd3_forward(model, latents, conds, ts, cache=PatchCache(caches))
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, atol=1e-6, rtol=0)
        assert [c.skipped for c in caches] == [2 * 2 * 4, 2 * 2 * 9, 2 * 2 * 16]
        moved = [x.clone() for x in latents]
        moved[2][..., :4, :4] += 1.0  # the first 2x2-token patch of the 16x16 latent
        got = sd3_forward(model, moved, conds, ts, cache=PatchCache(caches))
        fresh = sd3_forward(model, moved, conds, ts)
    # each block recomputes only the moved patch: the skipped ones keep their outputs (they do not see the
    # change, the approximation the cache makes), the moved one attends over their cached keys and values
    assert caches[2].computed == 2 * 16 + 2 and (caches[0].computed, caches[0].skipped) == (2 * 4, 3 * 2 * 4)
    for i in (0, 1):
        torch.testing.assert_close(got[i], fresh[i], atol=1e-6, rtol=0)
    rest = torch.ones_like(got[2], dtype=torch.bool)
    rest[..., :4, :4] = False
    torch.testing.assert_close(got[2][rest], ref[2][rest], atol=1e-6, rtol=0)
    assert not torch.allclose(got[2][~rest], ref[2][~rest], atol=1e-2)
    assert not torch.allclose(got[2][rest], fresh[2][rest], atol=1e-5)


def test_a_large_threshold_skips_patches_and_changes_the_result_a_little(world):
    ref, _ = cached_run(CachePolicy(0.0, 3, patch=2))
    got, caches = cached_run(CachePolicy(0.5, 3, patch=2))
    assert all(c.skipped_fraction > 0.2 for c in caches if c)
    rel = [float((g - r).norm() / r.norm()) for g, r in zip(got, ref)]
    assert rel[1] < 1e-5  # no cache on the middle request: its image does not see the others' reuse
    assert 1e-4 < rel[0] < 0.5 and 1e-4 < rel[2] < 0.5


def test_patch_cache_refused_under_sequence_parallelism():
    model = tiny()
    specs, conds, latents = batch("sd3", (8,))
    with pytest.raises(NotImplementedError, match="patch cache under sequence parallelism"):
        sd3_forward(model, latents, conds, torch.tensor([1.0]), SeqShard(None, 0, 2),
                    cache=PatchCache([RequestCache(CachePolicy(0.1, 1))]))
