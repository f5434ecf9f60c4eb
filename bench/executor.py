"""Executor overhead: per-step time of the Worker runtime vs a bare diffusers denoising loop.

Both run in this one process, on the same tiny seeded model and request, interleaved repetition by
repetition so machine noise hits both alike; the ratio is of the medians from the same run. The Worker
path (degree 1) adds the runtime's bookkeeping, the SP hooks in pass-through and the SP processor.
Usage: python -m bench.executor [--family flux] [--side 32] [--steps 8] [--repeats 5] [--threads 1]
(``--family`` any of the catalog's; ``--frames`` for the video ones)
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from ditplan.executor.runtime import Worker
from ditplan.models.torch import FAMILIES, LatentSpec, ModelSource, family, set_timesteps


def bare_loop(source: ModelSource, text, model, spec: LatentSpec) -> list[float]:
    fam = family(spec.family)
    s = source.scheduler(spec.family)
    set_timesteps(s, spec)
    times = []
    with torch.no_grad():
        cond = fam.encode(text, spec, source.vae_scale(spec.family))
        x = fam.noise(model.config, spec, torch.Generator().manual_seed(spec.seed)) * getattr(s, "init_noise_sigma",
                                                                                              1.0)
        for ts in s.timesteps:
            t0 = time.perf_counter()
            x_in = s.scale_model_input(x, ts) if hasattr(s, "scale_model_input") else x
            x = s.step(fam.predict(model, spec, x_in, cond, ts), ts, x).prev_sample
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="flux", choices=list(FAMILIES))
    ap.add_argument("--side", type=int, default=32, help="latent side (image tokens = (side / 2)^2 a latent frame)")
    ap.add_argument("--frames", type=int, default=9, help="video frames (4 per latent frame after the first)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        source = ModelSource()
        text, bare_model = source.build(args.family, "text"), source.build(args.family, "backbone")
        worker = Worker(0, 1, source)
        frames = args.frames if args.family in ("cogvideox", "hunyuanvideo", "wan") else 1
        bare, ours = [], []
        for i in range(args.repeats + 1):  # the first repetition warms up and is dropped
            spec = LatentSpec(f"r{i}", args.family, args.side, args.side, args.steps, seed=i, frames=frames)
            b = bare_loop(source, text, bare_model, spec)
            worker.handle({"op": "encode", "specs": [spec], "rank": 0})
            o = worker.handle({"op": "run", "rids": [spec.rid], "steps": args.steps})
            worker.handle({"op": "release", "rid": spec.rid})
            if i:
                bare += b
                ours += o
        dist.destroy_process_group()
    mb, mo = statistics.median(bare), statistics.median(ours)
    tokens = (args.side // 2) ** 2 * LatentSpec("x", args.family, 1, 1, 1, frames=frames).latent_frames
    print(f"{args.family} tiny, {args.side}x{args.side} latent ({tokens} image tokens), {args.steps} steps x "
          f"{args.repeats} repeats, {args.threads} thread(s)")
    print(f"{'path':<22}{'median step ms':>16}")
    print(f"{'bare diffusers loop':<22}{mb * 1e3:>16.3f}")
    print(f"{'executor Worker (k=1)':<22}{mo * 1e3:>16.3f}")
    print(f"ratio {mo / mb:.3f} (overhead {(mo - mb) * 1e3:+.3f} ms/step)")


if __name__ == "__main__":
    main()
