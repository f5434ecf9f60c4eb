"""CSP batches and the patch cache on a tiny seeded SD3, on this CPU.

1. Throughput of one denoising step over a 512/768/1024-px mix (SD3 latents 64/96/128, divided by
   ``--downscale``; side ratios 1:1.5:2 kept), ``--per-res`` images of each: (a) one CSP batch of the whole mix
   (``models/torch/csp.py``, per-image attention ``loop``, and ``mask`` for comparison), (b) one batch per
   resolution with the stock diffusers forward, run one after another, (c) every image alone. Images per second,
   medians over ``--repeats`` (the variants interleaved in each repeat, one warm-up dropped), as ratios to (c).
2. The patch cache over a full denoising run (``--steps``) of the mix through the executor's ``Worker``, every
   request under one ``CachePolicy(threshold, --max-skips, patch)``: the fraction of patch-blocks skipped, the
   relative L2 error of the final latents against the uncached run (the worst request) and the run's wall time
   as a ratio to the uncached one. The patch is PatchedServe's 256 px (32 latent pixels = 16 tokens at full
   scale), i.e. ``16 // --downscale`` tokens, so each image has as many patches as at full scale.

The model: ``SD3Transformer2DModel`` with ``--layers`` blocks (default 4), 4 heads of 16 (width 64), seeded
random weights; the tests' one has 2 blocks of 4 heads of 8.

Usage: python -m bench.csp [--downscale 4] [--per-res 2] [--repeats 9] [--steps 8] [--threads 1]
       [--thresholds 0,0.02,0.05,0.1,0.2] [--max-skips 2] [--cache-repeats 3] [--flex] [--json out/csp.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ditplan.executor.runtime import Worker
from ditplan.models.torch import LatentSpec, ModelSource, family
from ditplan.models.torch.csp import sd3_forward
from ditplan.models.torch.patch_cache import CachePolicy

PIXELS = (512, 768, 1024)
VAE = 8  # SD3's VAE: 8 pixels per latent cell


def build_model(layers: int):
    import diffusers
    cfg = dict(family("sd3").tiny_config(4), num_layers=layers, attention_head_dim=16, caption_projection_dim=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return diffusers.SD3Transformer2DModel(**cfg).eval().requires_grad_(False)


def mix(downscale: int, per_res: int, steps: int) -> list[LatentSpec]:
    sides = [px // VAE // downscale for px in PIXELS]
    return [LatentSpec(f"{px}px-{j}", "sd3", side, side, steps, seed=10 * i + j)
            for i, (px, side) in enumerate(zip(PIXELS, sides)) for j in range(per_res)]


def throughput(model, specs, repeats: int, attention_modes) -> dict:
    fam, text = family("sd3"), ModelSource().build("sd3", "text")
    conds = [fam.encode(text, s, VAE) for s in specs]
    lat = [fam.noise(model.config, s, torch.Generator().manual_seed(s.seed)) for s in specs]
    ts = torch.linspace(1000.0, 100.0, len(specs))  # every image at its own step
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault(s.height, []).append(i)

    def per_resolution():
        for idx in groups.values():
            fam.predict(model, specs[idx[0]], torch.cat([lat[i] for i in idx]),
                        {k: torch.cat([conds[i][k] for i in idx]) for k in conds[0]}, ts[idx])

    def alone():
        for i, s in enumerate(specs):
            fam.predict(model, s, lat[i], conds[i], ts[i:i + 1])

    variants = {f"csp-{m}": (lambda m=m: sd3_forward(model, lat, conds, ts, attention=m)) for m in attention_modes}
    variants.update({"per-resolution": per_resolution, "alone": alone})
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        ref = [fam.predict(model, s, x, cd, t[None]) for s, x, cd, t in zip(specs, lat, conds, ts)]
        err = {f"csp-{m}": max(float((c - r).abs().max()) for c, r in zip(sd3_forward(model, lat, conds, ts,
                                                                                       attention=m), ref))
               for m in attention_modes}  # each CSP variant against every image alone, once
        for r in range(repeats + 1):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                if r:  # the first repeat warms up (and compiles flex) and is dropped
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "images_per_s": {k: len(specs) / v for k, v in med.items()},
            "speedup_vs_alone": {k: med["alone"] / v for k, v in med.items()}, "max_abs_diff_vs_alone": err}


def denoise(model, specs, policy: CachePolicy | None):
    """A full denoising run of the mix as one CSP batch on a one-rank ``Worker``: (latents, caches, seconds)."""
    rids = [s.rid for s in specs]
    w = Worker(0, 1, modules={("sd3", "backbone"): model}, cache_policies={} if policy is None else {"c": policy})
    w.handle({"op": "encode", "specs": specs, "rank": 0})
    t0 = time.perf_counter()
    w.handle({"op": "run", "rids": rids, "steps": specs[0].steps,
              "cache": {} if policy is None else {r: "c" for r in rids}})
    seconds = time.perf_counter() - t0
    return [w.states[r].latent for r in rids], [w.states[r].cache for r in rids], seconds


def cache_sweep(model, specs, thresholds, max_skips: int, patch: int, repeats: int) -> list[dict]:
    """Per threshold: skipped fraction, worst relative L2 of the final latents against the uncached run, and
    the median wall time over ``repeats`` runs (interleaved with the uncached one's) as a ratio to it."""
    denoise(model, specs, None)  # warm-up
    policies = [None] + [CachePolicy(th, max_skips, patch) for th in thresholds]
    walls: list[list[float]] = [[] for _ in policies]
    results = {}
    for _ in range(repeats):
        for i, policy in enumerate(policies):
            results[i] = denoise(model, specs, policy)
            walls[i].append(results[i][2])
    ref, base = results[0][0], statistics.median(walls[0])
    rows = []
    for i, policy in enumerate(policies[1:], start=1):
        latents, caches, _ = results[i]
        skipped = sum(c.skipped for c in caches) / sum(c.computed + c.skipped for c in caches)
        rel = max(float((g - r).norm() / r.norm()) for g, r in zip(latents, ref))
        rows.append({"threshold": policy.threshold, "max_skips": max_skips, "patch_tokens": patch,
                     "skipped_fraction": skipped, "max_rel_l2": rel, "wall_ratio": statistics.median(walls[i]) / base})
    return rows


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for r in [header, *rows]:
            print("  ".join(f"{c:>16}" for c in r))
        return
    t = Table(title=title)
    for h in header:
        t.add_column(h, justify="right")
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--downscale", type=int, default=4, help="latent sides 64/96/128 divided by this")
    ap.add_argument("--per-res", type=int, default=2, help="images of each resolution")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps of the cache sweep")
    ap.add_argument("--thresholds", default="0,0.02,0.05,0.1,0.2")
    ap.add_argument("--max-skips", type=int, default=2)
    ap.add_argument("--cache-repeats", type=int, default=3, help="full runs per threshold (median wall time)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flex", action="store_true", help="also time flex_attention (compiles: ~30 s a layout)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if any(px // VAE % (2 * args.downscale) for px in PIXELS):
        ap.error(f"--downscale {args.downscale}: latents 64/96/128 divided by it must be even (SD3's 2x2 patches)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = build_model(args.layers)
    specs = mix(args.downscale, args.per_res, args.steps)
    modes = ["loop", "mask"] + (["flex"] if args.flex else [])
    tp = throughput(model, specs, args.repeats, modes)
    patch = max(1, 16 // args.downscale)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        try:
            cache = cache_sweep(model, specs, [float(x) for x in args.thresholds.split(",")], args.max_skips, patch,
                                args.cache_repeats)
        finally:
            dist.destroy_process_group()
    sides = sorted({s.height for s in specs})
    print(f"tiny SD3 ({args.layers} blocks, width 64), {'/'.join(map(str, PIXELS))} px -> latents "
          f"{'/'.join(map(str, sides))} (downscale {args.downscale}), {args.per_res} of each, "
          f"{args.threads} thread(s), {args.repeats} repeats")
    diff = tp["max_abs_diff_vs_alone"]
    table("one step over the mix", ["batching", "median ms", "images/s", "vs alone", "max |diff| vs alone"],
          [[k, f"{tp['median_s'][k] * 1e3:.2f}", f"{tp['images_per_s'][k]:.1f}", f"{tp['speedup_vs_alone'][k]:.3f}",
            f"{diff[k]:.1e}" if k in diff else "-"] for k in tp["median_s"]])
    table(f"patch cache, {args.steps} steps, max_skips {args.max_skips}, patch {patch} tokens",
          ["threshold", "skipped", "max rel L2", "wall vs off"],
          [[f"{r['threshold']:g}", f"{r['skipped_fraction']:.3f}", f"{r['max_rel_l2']:.2e}", f"{r['wall_ratio']:.3f}"]
           for r in cache])
    failed = []
    for k, d in diff.items():
        if not d <= 1e-4:
            failed.append(f"{k} differs from the images alone by {d:.2e} (> 1e-4)")
    zero = [r for r in cache if r["threshold"] == 0]
    if zero and (zero[0]["max_rel_l2"] != 0 or zero[0]["skipped_fraction"] != 0):
        failed.append("the cache at threshold 0 is not the uncached run")
    for f in failed:
        print(f"FAILED: {f}", file=sys.stderr)
    result = {"config": vars(args) | {"json": str(args.json) if args.json else None, "latent_sides": sides,
                                      "patch_tokens": patch, "load_average": os.getloadavg()},
              "throughput": tp, "cache": cache, "failed": failed, "wall_s": round(time.perf_counter() - started, 1)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
