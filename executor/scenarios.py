"""Equivalence scenarios run by tests/test_executor.py (and usable as a smoke test on real devices).

``equivalence(rank, world)`` drives one ``Worker`` per rank through a fixed command list and returns,
on rank 0, the final latents by name; other ranks return None. Everything is seeded, so the same
request spec gives the same noise, conditioning and (tiny) weights on every rank.
"""
from __future__ import annotations

import torch.distributed as dist

from ditplan.executor.runtime import Worker, tiny_models
from ditplan.models.torch import LatentSpec


def _collect(worker: Worker, rid: str, name: str, out: dict) -> None:
    got = worker.handle({"op": "fetch", "rid": rid})
    lead = worker.where[rid][0]
    box = [got]
    if lead != 0:  # ship the lead's latent to rank 0
        dist.broadcast_object_list(box, src=lead)
    if worker.rank == 0:
        out[name] = box[0]


def equivalence(rank: int, world: int) -> dict | None:
    w = Worker(rank, world, tiny_models(("flux", "sd3"), num_attention_heads=4))
    out: dict = {}
    all_ranks = tuple(range(world))
    degrees = [k for k in (1, 2, 4) if k <= world]

    def req(rid, family, seed, steps=4):
        return LatentSpec(rid, family, 8, 8, steps, seed=seed)

    for family in ("flux", "sd3"):
        for k in degrees:  # the same request at each SP degree
            rid = f"{family}-sp{k}"
            w.handle({"op": "create", "spec": req(rid, family, seed=1), "ranks": all_ranks[:k]})
            w.handle({"op": "run", "rids": [rid], "steps": 4})
            _collect(w, rid, rid, out)
            w.handle({"op": "release", "rid": rid})

    # pause after 2 steps, run another request on the same group, resume
    g2 = all_ranks[:2]
    w.handle({"op": "create", "spec": req("p", "flux", seed=1), "ranks": g2})
    w.handle({"op": "run", "rids": ["p"], "steps": 2})
    w.handle({"op": "pause", "rid": "p"})
    w.handle({"op": "create", "spec": req("other", "flux", seed=7), "ranks": g2})
    w.handle({"op": "run", "rids": ["other"], "steps": 4})
    w.handle({"op": "resume", "rid": "p"})
    w.handle({"op": "run", "rids": ["p"], "steps": 2})
    _collect(w, "p", "flux-pause-resume", out)

    # stopped at a step boundary by the lead (the other rank's own answer is ignored), then resumed
    w.handle({"op": "create", "spec": req("c", "flux", seed=1), "ranks": g2})
    w.should_stop = (lambda cmd, k: k >= 2) if rank == 0 else (lambda cmd, k: False)
    ran = w.handle({"op": "run", "rids": ["c"], "steps": 4})
    w.should_stop = None
    steps_after_stop = w.states["c"].step if "c" in w.states else None
    w.handle({"op": "run", "rids": ["c"], "steps": 4})
    _collect(w, "c", "flux-stop-resume", out)
    if rank in g2:
        out["stop"] = {"ran": len(ran), "step": steps_after_stop}
    box = [out.get("stop")]
    if world > 1:
        dist.broadcast_object_list(box, src=1)  # rank 1's view: it followed the lead's decision
    if rank == 0:
        out["stop_rank1"] = box[0]

    # migrate: 1 step at degree 1 on rank 0, 1 step at degree 2 on the upper block, the rest at degree world
    upper = all_ranks[world - 2:] if world >= 2 else all_ranks
    w.handle({"op": "create", "spec": req("m", "flux", seed=1), "ranks": (0,)})
    w.handle({"op": "run", "rids": ["m"], "steps": 1})
    w.handle({"op": "migrate", "rid": "m", "ranks": upper})
    w.handle({"op": "run", "rids": ["m"], "steps": 1})
    w.handle({"op": "migrate", "rid": "m", "ranks": all_ranks})
    w.handle({"op": "run", "rids": ["m"], "steps": 2})
    w.handle({"op": "migrate", "rid": "m", "ranks": (0,)})
    _collect(w, "m", "flux-migrate", out)

    # a batch of two same-shape requests against the two run alone (degree 2)
    for fam in ("flux", "sd3"):
        for rid, seed in (("a", 11), ("b", 12)):
            w.handle({"op": "create", "spec": req(f"{fam}-{rid}-batch", fam, seed), "ranks": g2})
            w.handle({"op": "create", "spec": req(f"{fam}-{rid}-alone", fam, seed), "ranks": g2})
            w.handle({"op": "run", "rids": [f"{fam}-{rid}-alone"], "steps": 4})
            _collect(w, f"{fam}-{rid}-alone", f"{fam}-{rid}-alone", out)
        w.handle({"op": "run", "rids": [f"{fam}-a-batch", f"{fam}-b-batch"], "steps": 4})
        for rid in ("a", "b"):
            _collect(w, f"{fam}-{rid}-batch", f"{fam}-{rid}-batch", out)
    out["sp_calls"] = w.ctx.sp_calls
    return out if rank == 0 else None


def single_process_reference() -> dict:
    """The same requests run by plain diffusers code in this process (no Worker, no SP hooks)."""
    import torch
    from ditplan.models.torch import make_request_tensors, make_scheduler, predict, set_timesteps, tiny_transformer
    out = {}
    for family in ("flux", "sd3"):
        model = tiny_transformer(family, num_attention_heads=4)
        for name, seed in (("ref", 1), ("a", 11), ("b", 12)):
            spec = LatentSpec(name, family, 8, 8, 4, seed=seed)
            t = make_request_tensors(model, spec)
            s = make_scheduler(family)
            set_timesteps(s, spec)
            x = t.latent
            with torch.no_grad():
                for ts in s.timesteps:
                    x = s.step(predict(model, spec, x, t.cond, ts), ts, x).prev_sample
            out[f"{family}-{name}"] = x
    return out
