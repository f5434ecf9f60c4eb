"""Model placement: which weights each GPU holds, and how they get there.

Every GPU holds only the weights the plan put there, per model and per
component (``backbone``, ``text`` encoders, ``vae`` decoder; see
``models.catalog.COMPONENTS``). A stage runs only on GPUs that hold its
component: diffuse needs the backbone on every GPU of its block, encode the
text encoders and decode the VAE on the GPUs it runs on. The memory rule is
the same everywhere (planner, checker, simulator): resident weights +
activations + paused latents <= the GPU's memory.

A plan changes placement with :class:`WeightLoad` actions: an unload frees
the bytes at once; a load keeps the GPU busy for ``bytes / load_bw`` seconds
(host memory to the GPU) and runs nothing else meanwhile.

Peer policies run on a static placement (:func:`static_placement`): every
model everywhere when they all fit, else GPUs split across models in
proportion to each model's share of the trace's GPU-seconds. The schedule
planner re-decides placement as the load shifts (``planner.solvers.placement``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ditplan.models.catalog import COMPONENTS, STAGE_COMPONENT, get_model
from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.errors import PlacementError
from ditplan.planner.request import Request, Stage

Weight = tuple[str, str]  # (model, component)
PLACEMENT_MODES = ("auto", "replicate", "split", "stages")


@dataclass(frozen=True)
class WeightLoad:
    """Load (or, in ``RoundPlan.unloads``, free) one component of one model on one GPU."""

    gpu: int
    model: str
    component: str

    @property
    def weight(self) -> Weight:
        return (self.model, self.component)

    @property
    def bytes(self) -> int:
        return get_model(self.model).component_bytes(self.component)


def weight_name(model: str, component: str) -> str:
    """The wire and problem-file spelling of a weight: ``flux-dev/backbone``."""
    return f"{model}/{component}"


def parse_weight(text: str, where: str = "weight") -> Weight:
    """``model/component`` -> (model, component); a ``PlacementError`` names ``where`` and the value."""
    model, sep, component = str(text).partition("/")
    if not sep or component not in COMPONENTS:
        raise PlacementError(f"{where} = {text!r} is not MODEL/COMPONENT with COMPONENT one of "
                             f"{', '.join(COMPONENTS)}")
    try:
        get_model(model)
    except Exception as exc:
        raise PlacementError(f"{where} = {text!r}: {exc}") from None
    return model, component


def load_seconds(cluster: Cluster, model: str, component: str) -> float:
    """Seconds to load one component onto a GPU of ``cluster`` from host memory."""
    return get_model(model).component_bytes(component) / cluster.kind.load_bw


def full_model(model: str) -> frozenset[Weight]:
    return frozenset((model, c) for c in COMPONENTS)


@dataclass(frozen=True)
class Placement:
    """Per GPU, the resident weights (loads in progress included: their bytes are taken)."""

    resident: tuple[frozenset[Weight], ...]

    @classmethod
    def of_models(cls, per_gpu: Sequence[Iterable[str]]) -> "Placement":
        """Whole models (every component) per GPU."""
        return cls(tuple(frozenset().union(*(full_model(m) for m in ms)) for ms in per_gpu))

    @classmethod
    def replicate(cls, n_gpus: int, models: Iterable[str]) -> "Placement":
        models = tuple(models)
        return cls.of_models([models] * n_gpus)

    @classmethod
    def from_names(cls, per_gpu: Sequence[Iterable[str]], where: str = "placement") -> "Placement":
        """Per GPU, ``model/component`` names (the wire format)."""
        return cls(tuple(frozenset(parse_weight(w, f"{where}[{g}]") for w in ws) for g, ws in enumerate(per_gpu)))

    def names(self) -> tuple[tuple[str, ...], ...]:
        """Per GPU, sorted ``model/component`` names."""
        return tuple(tuple(sorted(weight_name(m, c) for m, c in res)) for res in self.resident)

    @property
    def size(self) -> int:
        return len(self.resident)

    def holds(self, gpu: int, model: str, component: str) -> bool:
        return (model, component) in self.resident[gpu]

    def runs(self, gpus: Iterable[int], model: str, stage: Stage) -> bool:
        """Every GPU of ``gpus`` holds what ``stage`` of ``model`` runs on."""
        w = (model, STAGE_COMPONENT[stage])
        return all(w in self.resident[g] for g in gpus)

    def models_on(self, gpu: int, component: str = "backbone") -> tuple[str, ...]:
        return tuple(sorted(m for m, c in self.resident[gpu] if c == component))

    def gpus_with(self, model: str, component: str = "backbone") -> tuple[int, ...]:
        return tuple(g for g, res in enumerate(self.resident) if (model, component) in res)

    def weight_bytes(self, gpu: int) -> int:
        return sum(get_model(m).component_bytes(c) for m, c in self.resident[gpu])

    def weight_bytes_all(self) -> list[int]:
        return [self.weight_bytes(g) for g in range(self.size)]

    def apply(self, unloads: Iterable[WeightLoad] = (), loads: Iterable[WeightLoad] = ()) -> "Placement":
        res = [set(r) for r in self.resident]
        for u in unloads:
            res[u.gpu].discard(u.weight)
        for ld in loads:
            res[ld.gpu].add(ld.weight)
        return Placement(tuple(frozenset(r) for r in res))

    def changes_to(self, target: "Placement") -> tuple[tuple[WeightLoad, ...], tuple[WeightLoad, ...]]:
        """(unloads, loads) that turn this placement into ``target``."""
        unloads, loads = [], []
        for g, (now, then) in enumerate(zip(self.resident, target.resident)):
            unloads += [WeightLoad(g, m, c) for m, c in sorted(now - then)]
            loads += [WeightLoad(g, m, c) for m, c in sorted(then - now)]
        return tuple(unloads), tuple(loads)

    def describe(self) -> str:
        """``flux-dev: 0-5; cogvideox-5b: 6,7`` (backbones)."""
        models = sorted({m for res in self.resident for m, c in res if c == "backbone"})
        parts = [f"{m}: {_ranges(self.gpus_with(m))}" for m in models]
        return "; ".join(parts) or "nothing resident"


def _ranges(gpus: Sequence[int]) -> str:
    out, i = [], 0
    while i < len(gpus):
        j = i
        while j + 1 < len(gpus) and gpus[j + 1] == gpus[j] + 1:
            j += 1
        out.append(str(gpus[i]) if i == j else f"{gpus[i]}-{gpus[j]}")
        i = j + 1
    return ",".join(out)


# --- what fits -----------------------------------------------------------------

def smallest_footprint(model: str, request: Request | None = None, max_sp: int = 8) -> int:
    """Bytes one GPU needs to run ``model`` at all: its weights + the activations at the widest degree."""
    spec = get_model(model)
    act = 0
    if request is not None:
        k = max(spec.sp_degrees(max_sp))
        act = spec.activation_bytes(request.shape, k)
    return spec.weight_bytes + act


def check_fits(requests: Sequence[Request], cluster: Cluster,
               where: Mapping[str, str] | None = None) -> None:
    """Refuse a request no placement can ever serve (its model's footprint exceeds every GPU).

    ``where`` labels a request in the error (``line 7``, ``requests[3]``).
    """
    largest = max(g.memory for g in cluster.gpus)
    for r in requests:
        need = smallest_footprint(r.model, r, cluster.max_node_gpus)
        if need > largest:
            label = f"{where[r.id]}: " if where and r.id in where else ""
            raise PlacementError(f"{label}request {r.id!r}: model {r.model} needs {need} bytes on one GPU "
                              f"(weights {get_model(r.model).weight_bytes} + activations) but the largest GPU "
                              f"of {cluster.name} has {largest} bytes")


# --- static placements ---------------------------------------------------------

def gpu_seconds_by_model(requests: Sequence[Request], cost: CostModel) -> dict[str, float]:
    """Each model's GPU-seconds in ``requests`` at degree 1 (the cheapest)."""
    out: dict[str, float] = {}
    for r in requests:
        spec = get_model(r.model)
        s = (cost.encode_time(spec, r.shape) + r.steps * cost.step_time(spec, r.shape, 1, 1)
             + cost.decode_time(spec, r.shape))
        out[r.model] = out.get(r.model, 0.0) + s
    return out


def apportion(total: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder split of ``total`` GPUs by ``shares``, at least one each (ties: name order)."""
    models = sorted(shares)
    if total < len(models):
        raise PlacementError(f"placement: {len(models)} models ({', '.join(models)}) need at least "
                             f"{len(models)} GPUs, the split has {total}")
    s = sum(shares.values()) or 1.0
    quota = {m: total * shares[m] / s for m in models}
    out = {m: max(1, math.floor(quota[m])) for m in models}
    while sum(out.values()) < total:
        out[max(models, key=lambda m: (quota[m] - out[m], -models.index(m)))] += 1
    while sum(out.values()) > total:
        out[min((m for m in models if out[m] > 1), key=lambda m: (quota[m] - out[m], m))] -= 1
    return out


def _layout(node: Sequence[int], counts: Mapping[str, int]) -> dict[int, str]:
    """Contiguous runs inside a node, largest first, so big shares start on aligned blocks."""
    out, pos = {}, 0
    for m in sorted(counts, key=lambda m: (-counts[m], m)):
        for g in node[pos:pos + counts[m]]:
            out[g] = m
        pos += counts[m]
    return out


def largest_activation(requests: Sequence[Request], cluster: Cluster) -> int:
    """Bytes of the largest activation any of ``requests`` needs on one GPU, at the widest degree."""
    return max((smallest_footprint(r.model, r, cluster.max_node_gpus) - get_model(r.model).weight_bytes
                for r in requests), default=0)


def fits_everywhere(models: Iterable[str], cluster: Cluster, requests: Sequence[Request] = ()) -> bool:
    """Every model's weights fit on every GPU, with room for the largest activation at the widest degree."""
    act = largest_activation(requests, cluster)
    return sum(get_model(m).weight_bytes for m in models) + act <= min(g.memory for g in cluster.gpus)


def parse_split(text: str) -> dict[str, int]:
    """``flux-dev:6,cogvideox-5b:2`` -> GPUs per node per model."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition(":")
        try:
            get_model(name.strip())
            n = int(count)
        except Exception:
            raise PlacementError(f"--placement: {part!r} is not MODEL:GPUS with a known model and an integer") from None
        if not sep or n < 0:
            raise PlacementError(f"--placement: {part!r} is not MODEL:GPUS with GPUS >= 0")
        out[name.strip()] = n
    if not out:
        raise PlacementError(f"--placement: {text!r} names no model")
    return out


def static_placement(cluster: Cluster, requests: Sequence[Request], cost: CostModel,
                     spec: str = "auto", models: Iterable[str] | None = None,
                     shares: Mapping[str, float] | None = None, split: str = "split") -> Placement:
    """The placement a static baseline runs on.

    ``replicate``: every model on every GPU. ``split``: each node's GPUs split
    across the trace's models in proportion to their GPU-seconds (at least one
    GPU each). ``stages``: encode/decode GPUs apart (:func:`stage_placement`).
    ``auto``: replicate when everything fits, else ``split`` (``split`` or
    ``stages``, the policy's own). ``MODEL:GPUS,...``: that many GPUs of each
    node per model. ``models`` and ``shares`` replace the trace's models and
    GPU-seconds (a service has no trace to weigh).
    """
    models = sorted(set(models) if models is not None else {r.model for r in requests})
    if not models:
        return Placement.replicate(cluster.size, ())
    if spec == "auto":
        spec = "replicate" if fits_everywhere(models, cluster, requests) else split
    if spec == "replicate":
        return Placement.replicate(cluster.size, models)
    if spec == "stages":
        return stage_placement(cluster, requests, cost, models)
    if spec == "split":
        shares = dict(shares) if shares is not None else gpu_seconds_by_model(requests, cost)
        per_node = [apportion(len(node), shares) for node in cluster.nodes] \
            if min(len(n) for n in cluster.nodes) >= len(models) else None
        if per_node is None:  # nodes smaller than the model count: split the whole cluster
            flat = tuple(g.index for g in cluster.gpus)
            owner = _layout(flat, apportion(cluster.size, shares))
        else:
            owner = {}
            for node, counts in zip(cluster.nodes, per_node):
                owner.update(_layout(node, counts))
        return Placement.of_models([[owner[g]] for g in range(cluster.size)])
    counts = parse_split(spec)
    missing = [m for m in models if counts.get(m, 0) == 0]
    if missing:
        raise PlacementError(f"--placement {spec!r}: the trace's model(s) {', '.join(missing)} get no GPU")
    owner = {}
    for node in cluster.nodes:
        if sum(counts.values()) > len(node):
            raise PlacementError(f"--placement {spec!r}: {sum(counts.values())} GPUs per node, "
                              f"the node has {len(node)}")
        owner.update(_layout(node, counts))
    return Placement.of_models([[owner[g]] if g in owner else [] for g in range(cluster.size)])


def stage_placement(cluster: Cluster, requests: Sequence[Request], cost: CostModel,
                    models: Sequence[str]) -> Placement:
    """Hetu-DiT's disaggregated encode and decode workers as a placement.

    Per node, the last GPUs hold every model's text encoders and VAE and run
    every encode and decode; the others hold backbones only: all of them
    where they fit together, else split by each model's diffuse GPU-seconds.
    How many stage GPUs: the node apportioned between encode + decode and
    diffuse GPU-seconds (at least one each), so the split follows the trace.
    """
    stage_w = frozenset((m, c) for m in models for c in ("text", "vae"))
    stage_bytes = sum(get_model(m).component_bytes(c) for m, c in stage_w)
    smallest = min(g.memory for g in cluster.gpus)
    if stage_bytes > smallest:
        raise PlacementError(f"placement stages: the text encoders and VAEs of {', '.join(models)} need "
                             f"{stage_bytes} bytes on one GPU, a GPU of {cluster.name} has {smallest}")
    stage_s, diffuse_s = 0.0, {m: 0.0 for m in models}
    for r in requests:
        spec = get_model(r.model)
        stage_s += cost.encode_time(spec, r.shape) + cost.decode_time(spec, r.shape)
        diffuse_s[r.model] += r.steps * cost.step_time(spec, r.shape, 1, 1)
    if not any(diffuse_s.values()):  # no trace to weigh (a service): equal shares
        diffuse_s = {m: 1.0 for m in models}
        stage_s = stage_s or 1.0 / max(1, cluster.max_node_gpus)
    together = (sum(get_model(m).component_bytes("backbone") for m in models)
                + largest_activation(requests, cluster) <= smallest)
    resident: dict[int, frozenset[Weight]] = {}
    for node in cluster.nodes:
        if len(node) < 2:
            raise PlacementError(f"placement stages: a node of {cluster.name} has {len(node)} GPU; "
                                 "encode/decode GPUs apart need at least 2")
        n_stage = apportion(len(node), {"stage": stage_s, "diffuse": sum(diffuse_s.values())})["stage"]
        diffuse, stage = node[:len(node) - n_stage], node[len(node) - n_stage:]
        for g in stage:
            resident[g] = stage_w
        if together:
            for g in diffuse:
                resident[g] = frozenset((m, "backbone") for m in models)
        else:
            for g, m in _layout(diffuse, apportion(len(diffuse), diffuse_s)).items():
                resident[g] = frozenset({(m, "backbone")})
    return Placement(tuple(resident[g] for g in range(cluster.size)))


def validate_placement(placement: Placement, cluster: Cluster) -> None:
    """Weights alone must fit every GPU."""
    for g in range(cluster.size):
        w = placement.weight_bytes(g)
        if w > cluster.gpus[g].memory:
            raise PlacementError(f"placement: GPU {g} would hold {w} bytes of weights "
                              f"({', '.join(placement.models_on(g))}), it has {cluster.gpus[g].memory}")
