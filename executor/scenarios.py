"""Equivalence scenarios run by tests/test_executor.py (and usable as a smoke test on real devices).

``equivalence(rank, world, out_dir)`` drives one ``Worker`` per rank (tiny seeded modules, built on first use)
through a fixed command list and returns, on rank 0, the final latents and decoded pixels by name; other
ranks return None. Everything is seeded, so the same request spec gives the same prompt, noise and weights
on every rank. ``single_process_reference`` runs the same requests through the families' pipeline code in
one process, without a Worker, SP hooks or a process group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ditplan.executor.runtime import Worker
from ditplan.executor.sequence_parallel import SP_FAMILIES
from ditplan.models.torch import FAMILIES, LatentSpec, ModelSource, family, set_timesteps

VIDEO = ("cogvideox", "hunyuanvideo", "wan")
STEPS = 3


def request(rid: str, fam: str, seed: int, steps: int = STEPS) -> LatentSpec:
    """An 8x8 latent (16 image tokens a frame); 9 frames for video: 3 latent frames, an odd count, as CogVideoX's
    VAE needs to give back 4 (n - 1) + 1 frames."""
    return LatentSpec(rid, fam, 8, 8, steps, seed=seed, frames=9 if fam in VIDEO else 1)


def _box(worker: Worker, value, src: int):
    """``value`` from rank ``src`` on rank 0 (None elsewhere)."""
    box = [value]
    if src != 0:
        dist.broadcast_object_list(box, src=src)
    return box[0] if worker.rank == 0 else None


def _collect(worker: Worker, rid: str, name: str, out: dict) -> None:
    got = _box(worker, worker.handle({"op": "fetch", "rid": rid}), worker.where[rid][0])
    if worker.rank == 0:
        out[name] = got


def _start(w: Worker, spec: LatentSpec, ranks, encode_rank: int | None = None) -> None:
    """Encode on ``encode_rank`` (default: the block's first), then move the embeddings to ``ranks``."""
    enc = ranks[0] if encode_rank is None else encode_rank
    w.handle({"op": "encode", "specs": [spec], "rank": enc})
    if (enc,) != tuple(ranks):
        w.handle({"op": "migrate", "rid": spec.rid, "ranks": tuple(ranks)})


def _decode(w: Worker, rid: str, rank: int, name: str, out: dict) -> None:
    """Move the latent to ``rank`` if it is elsewhere, decode there; pixels and PNG paths to rank 0."""
    if w.where[rid] != (rank,):
        w.handle({"op": "migrate", "rid": rid, "ranks": (rank,)})
    got = _box(w, w.handle({"op": "decode", "rids": [rid], "rank": rank}), rank)
    if w.rank == 0:
        out[name] = {"pixels": got["pixels"][rid], "files": got["files"][rid]}


def equivalence(rank: int, world: int, out_dir: str | None = None) -> dict | None:
    w = Worker(rank, world, ModelSource(heads=4), out_dir=out_dir)
    out: dict = {}
    everyone = tuple(range(world))
    degrees = [k for k in (2, 4) if k <= world]  # degree 1: the one-rank run below

    for fam in SP_FAMILIES:  # the same request at each SP degree
        for k in degrees:
            rid = f"{fam}-sp{k}"
            calls = w.ctx.sp_calls
            _start(w, request(rid, fam, seed=1), everyone[:k])
            w.handle({"op": "run", "rids": [rid], "steps": STEPS})
            _collect(w, rid, rid, out)
            if rank == 0:
                out[rid]["sp_calls"] = w.ctx.sp_calls - calls
            w.handle({"op": "release", "rid": rid})

    # every stage on one rank, against encode, diffuse and decode each on other ranks: the embeddings move
    # from the encode rank to the diffuse block, the latent from the block to the decode rank
    upper = everyone[-2:] if world >= 4 else everyone[-1:]
    for fam in FAMILIES:
        one = f"{fam}-one-rank"
        calls = w.ctx.sp_calls
        _start(w, request(one, fam, seed=1), (0,))
        w.handle({"op": "run", "rids": [one], "steps": STEPS})
        _collect(w, one, f"{fam}-sp1", out)  # SP degree 1
        if rank == 0:
            out[f"{fam}-sp1"]["sp_calls"] = w.ctx.sp_calls - calls
        _decode(w, one, 0, one, out)
        split = f"{fam}-split"
        block = upper if family(fam).sequence_parallel else upper[:1]
        _start(w, request(split, fam, seed=1), block, encode_rank=1 if world > 1 else 0)
        w.handle({"op": "run", "rids": [split], "steps": STEPS})
        _decode(w, split, 0, split, out)
        if rank == 0:
            out[split]["block"] = block

    # pause after 1 step, run another request on the same group, resume
    g2 = everyone[:2]
    _start(w, request("p", "flux", seed=1), g2)
    w.handle({"op": "run", "rids": ["p"], "steps": 1})
    w.handle({"op": "pause", "rid": "p"})
    _start(w, request("other", "flux", seed=7), g2)
    w.handle({"op": "run", "rids": ["other"], "steps": STEPS})
    w.handle({"op": "resume", "rid": "p"})
    w.handle({"op": "run", "rids": ["p"], "steps": STEPS})
    _collect(w, "p", "flux-pause-resume", out)

    # stopped at a step boundary by the lead (the other rank's own answer is ignored), then resumed
    _start(w, request("c", "flux", seed=1), g2)
    w.should_stop = (lambda cmd, k: k >= 2) if rank == 0 else (lambda cmd, k: False)
    ran = w.handle({"op": "run", "rids": ["c"], "steps": STEPS})
    w.should_stop = None
    steps_after_stop = w.states["c"].step if "c" in w.states else None
    w.handle({"op": "run", "rids": ["c"], "steps": STEPS})
    _collect(w, "c", "flux-stop-resume", out)
    if rank in g2:
        out["stop"] = {"ran": len(ran), "step": steps_after_stop}
    box = [out.get("stop")]
    if world > 1:
        dist.broadcast_object_list(box, src=1)  # rank 1's view: it followed the lead's decision
    if rank == 0:
        out["stop_rank1"] = box[0]

    # migrate: 1 step at degree 1 on rank 0, 1 at degree 2 on the upper block, the rest at degree ``world``;
    # Wan's UniPC carries a solver history, which moves with the scheduler
    for fam in ("flux", "wan"):
        rid = f"{fam}-migrate"
        _start(w, request(rid, fam, seed=1), (0,))
        w.handle({"op": "run", "rids": [rid], "steps": 1})
        w.handle({"op": "migrate", "rid": rid, "ranks": everyone[world - 2:] if world >= 2 else everyone})
        w.handle({"op": "run", "rids": [rid], "steps": 1})
        w.handle({"op": "migrate", "rid": rid, "ranks": everyone})
        w.handle({"op": "run", "rids": [rid], "steps": STEPS})
        w.handle({"op": "migrate", "rid": rid, "ranks": (0,)})
        _collect(w, rid, rid, out)

    # a batch of two same-shape requests against the two run alone (degree 2 where the family has SP)
    for fam in FAMILIES:
        group = g2 if family(fam).sequence_parallel else (0,)
        for name, seed in (("a", 11), ("b", 12)):
            _start(w, request(f"{fam}-{name}-batch", fam, seed), group)
            _start(w, request(f"{fam}-{name}-alone", fam, seed), group)
            w.handle({"op": "run", "rids": [f"{fam}-{name}-alone"], "steps": STEPS})
            _collect(w, f"{fam}-{name}-alone", f"{fam}-{name}-alone", out)
        w.handle({"op": "run", "rids": [f"{fam}-a-batch", f"{fam}-b-batch"], "steps": STEPS})
        for name in ("a", "b"):
            _collect(w, f"{fam}-{name}-batch", f"{fam}-{name}-batch", out)
    return out if rank == 0 else None


def single_process_reference(seeds=(1, 11, 12)) -> dict:
    """Each family's requests through its pipeline code alone: encode, the denoising loop, decode."""
    source = ModelSource(heads=4)
    out = {}
    with torch.no_grad():
        for fam_name, fam in FAMILIES.items():
            text, model, vae = (source.build(fam_name, c) for c in ("text", "backbone", "vae"))
            for seed in seeds:
                spec = request(f"ref{seed}", fam_name, seed)
                cond = fam.encode(text, spec, source.vae_scale(fam_name))
                s = source.scheduler(fam_name)
                set_timesteps(s, spec)
                x = fam.noise(model.config, spec, torch.Generator().manual_seed(seed)) * getattr(
                    s, "init_noise_sigma", 1.0)
                for t in s.timesteps:
                    x_in = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
                    x = s.step(fam.predict(model, spec, x_in, cond, t), t, x).prev_sample
                out[f"{fam_name}-{seed}"] = {"latent": x}
                if seed == seeds[0]:
                    out[f"{fam_name}-{seed}"]["pixels"] = fam.decode(vae, x, spec)
    return out
