"""RoundProblem: one planning instant as immutable data, shared by every backend.

Built from a PlannerState (live requests, GPUs, topology, memory, cost model)
the way PyJobShop feeds one ProblemData to several solvers: CP-SAT, the PuLP
MILP and the DP read the same numbers, and a problem round-trips through JSON
so benchmarks can replay exactly what a simulation saw.

Times are relative to ``now`` (0 = the planning instant).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable

from ditplan.models.catalog import STAGE_COMPONENT, get_model
from ditplan.models.csp import patch_count
from ditplan.planner.request import RequestState, RequestStatus, Stage
from ditplan.planner.state import PlannerState

FORMAT = "ditplan.round-problem/5"
_INT_KEYED = ("step_s", "move_s", "act_bytes", "batch_encode_s", "batch_decode_s")
_INT_KEYED2 = ("batch_step_s",)  # batch size -> SP degree -> seconds


@dataclass(frozen=True)
class ProblemRequest:
    id: str
    model: str
    kind: str  # "image" | "video"
    stage: Stage  # next stage
    remaining_steps: int
    deadline: float  # seconds from now (negative: already late)
    batch_key: str  # equal keys may share a forward pass
    max_batch: int
    encode_s: float
    decode_s: float
    step_s: dict[int, float]  # legal SP degree -> seconds per step (batch 1)
    batch_step_s: dict[int, dict[int, float]]  # batch size 2..max_batch -> SP degree -> seconds per step
    batch_encode_s: dict[int, float]  # batch size 2..max_batch -> seconds of a batched encode
    batch_decode_s: dict[int, float]  # ... of a batched decode
    latent_gpus: tuple[int, ...]  # where its latent lives (empty: nowhere yet)
    move_s: dict[int, float]  # node -> seconds to move the latent onto another block there
    sp_prev: int  # degree of its last diffuse segment (0: none)
    was_running: bool  # just finished a diffuse segment: not continuing it is a preemption
    act_bytes: dict[int, int]  # SP degree -> activation bytes per GPU
    latent_bytes: int
    # Seconds until the request can take new work: 0 for a waiting request; for
    # one in ``RoundProblem.in_flight``, when its running segment ends (its
    # stage and remaining steps are those after that segment).
    ready_in: float = 0.0
    steps_done: int = 0
    # Seconds to move its prompt embeddings from an encode GPU to another GPU of a node (the
    # slowest link there): what diffusing away from where it encoded costs before the first step.
    embed_s: float = 0.0
    # CSP batches (``models/csp.py``): requests with equal non-empty keys may share one, whatever their
    # sizes and progress; ``patches`` is its patch count, the predictor's feature.
    csp_key: str = ""
    patches: int = 0

    @property
    def fastest_step_s(self) -> float:
        return min(self.step_s.values())

    def remaining_lb(self) -> float:
        """Fastest time to finish from now on an empty cluster."""
        t = self.encode_s if self.stage is Stage.ENCODE else 0.0
        return t + self.remaining_steps * self.fastest_step_s + self.decode_s


@dataclass(frozen=True)
class ProblemGpu:
    index: int
    node: int
    free_in: float  # seconds until its in-flight work ends (0: idle now)
    memory_free: int  # bytes left after weights and resident latents
    weights: tuple[str, ...] = ()  # resident "model/component" (loads in progress included)
    load_bw: float = 0.0  # bytes/s of a weight load onto it (0: it cannot load)

    def holds(self, model: str, component: str) -> bool:
        return f"{model}/{component}" in self.weights


@dataclass(frozen=True)
class RoundProblem:
    now: float
    round_s: float
    requests: tuple[ProblemRequest, ...]
    gpus: tuple[ProblemGpu, ...]
    nodes: tuple[tuple[int, ...], ...]
    meta: dict = field(default_factory=dict, compare=False)
    # Requests with work running now (not assignable now); the schedule
    # plans their remaining work from when it ends (``ready_in``), so that
    # future capacity is not overestimated. Decoding requests are left out.
    in_flight: tuple[ProblemRequest, ...] = ()
    # CSP step-time predictor coefficients (``models/csp.py``): model -> SP degree -> coefficients,
    # for every CSP model among the requests.
    csp: dict[str, dict[int, tuple[float, ...]]] = field(default_factory=dict)

    @cached_property
    def node_of(self) -> dict[int, int]:
        """GPU index -> node index."""
        return {g: n for n, node in enumerate(self.nodes) for g in node}

    def runs(self, gpus, model: str, stage: Stage) -> bool:
        """Every GPU of ``gpus`` holds the component ``stage`` of ``model`` runs on."""
        w = f"{model}/{STAGE_COMPONENT[stage]}"
        return all(w in self._weights[g] for g in gpus)

    @cached_property
    def gpu_of(self) -> dict[int, ProblemGpu]:
        return {g.index: g for g in self.gpus}

    @cached_property
    def node_holders(self) -> dict[tuple[int, str], int]:
        """(node, model) -> how many GPUs of the node hold the model's backbone."""
        out: dict[tuple[int, str], int] = {}
        for g in self.gpus:
            for w in g.weights:
                model, comp = w.split("/")
                if comp == "backbone":
                    out[(g.node, model)] = out.get((g.node, model), 0) + 1
        return out

    @cached_property
    def requests_by_id(self) -> dict[str, ProblemRequest]:
        return {r.id: r for r in (*self.requests, *self.in_flight)}

    @cached_property
    def holders(self) -> dict[str, int]:
        """"model/component" -> how many GPUs hold it."""
        out: dict[str, int] = {}
        for g in self.gpus:
            for w in g.weights:
                out[w] = out.get(w, 0) + 1
        return out

    @cached_property
    def _weights(self) -> dict[int, frozenset[str]]:
        return {g.index: frozenset(g.weights) for g in self.gpus}

    @property
    def idle(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus if g.free_in <= 1e-9)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = FORMAT
        for r in (*d["requests"], *d["in_flight"]):  # JSON object keys are strings
            for key in _INT_KEYED:
                r[key] = {str(k): v for k, v in r[key].items()}
            for key in _INT_KEYED2:
                r[key] = {str(b): {str(k): v for k, v in row.items()} for b, row in r[key].items()}
        d["csp"] = {m: {str(k): list(c) for k, c in by_k.items()} for m, by_k in self.csp.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RoundProblem":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a round problem: format {d.get('format')!r}, expected {FORMAT!r}")
        def request(r: dict) -> ProblemRequest:
            r = dict(r)
            for key in _INT_KEYED:
                r[key] = {int(k): v for k, v in r[key].items()}
            for key in _INT_KEYED2:
                r[key] = {int(b): {int(k): v for k, v in row.items()} for b, row in r[key].items()}
            r["latent_gpus"] = tuple(r["latent_gpus"])
            r["stage"] = Stage(r["stage"])
            return ProblemRequest(**r)

        return cls(now=d["now"], round_s=d["round_s"],
                   requests=tuple(request(r) for r in d["requests"]),
                   gpus=tuple(ProblemGpu(**{**g, "weights": tuple(g.get("weights", ()))}) for g in d["gpus"]),
                   nodes=tuple(tuple(n) for n in d["nodes"]), meta=d.get("meta", {}),
                   in_flight=tuple(request(r) for r in d.get("in_flight", ())),
                   csp={m: {int(k): tuple(c) for k, c in by_k.items()} for m, by_k in d.get("csp", {}).items()})


def build_problem(state: PlannerState) -> RoundProblem:
    """The round problem of ``state``: its waiting requests, its GPUs, and its in-flight requests."""
    cluster = state.cluster
    resident = state.resident_bytes()
    weights = state.weight_bytes()
    reqs = tuple(_problem_request(state, st) for st in state.waiting())
    in_flight = tuple(_problem_request(state, st) for st in state.requests
                      if st.in_flight and st.next_stage is not None and st.state is not RequestState.DECODING)
    gpus = tuple(ProblemGpu(g.index, g.node, max(0.0, state.gpu_free_at[g.index] - state.now),
                            g.memory - weights[g.index] - resident[g.index],
                            tuple(sorted(f"{m}/{c}" for m, c in state.placement.resident[g.index])),
                            g.kind.load_bw)
                 for g in cluster.gpus)
    csp = {m: {k: state.cost.csp.coefficients(m, k) for k in get_model(m).sp_degrees(cluster.max_node_gpus)}
           for m in sorted({r.csp_key for r in (*reqs, *in_flight) if r.csp_key})}
    return RoundProblem(state.now, state.round_s, reqs, gpus, cluster.nodes, in_flight=in_flight, csp=csp)


def _problem_request(state: PlannerState, st: RequestStatus) -> ProblemRequest:
    cluster, cost = state.cluster, state.cost
    r = st.request
    spec = get_model(r.model)
    degrees = spec.sp_degrees(cluster.max_node_gpus)
    mb = cost.max_batch(spec, r.shape)
    bw = {k: (cluster.block_bandwidth(cluster.blocks(k)[0]) if k > 1 else None) for k in degrees}
    ready_in = 0.0
    if st.in_flight and st.latent_gpus:
        ready_in = max(0.0, max(state.gpu_free_at[g] for g in st.latent_gpus) - state.now)
    csp_key = r.csp_key()
    return ProblemRequest(
        id=r.id, model=r.model, kind=r.kind, stage=st.next_stage,
        remaining_steps=st.remaining_steps, deadline=r.deadline - state.now,
        batch_key=f"{r.model}|{r.shape}|{r.steps}", max_batch=mb,
        encode_s=cost.encode_time(spec, r.shape), decode_s=cost.decode_time(spec, r.shape),
        step_s={k: cost.step_time(spec, r.shape, k, 1, bw[k]) for k in degrees},
        batch_step_s={b: {k: cost.step_time(spec, r.shape, k, b, bw[k]) for k in degrees} for b in range(2, mb + 1)},
        batch_encode_s={b: cost.encode_time(spec, r.shape, b) for b in range(2, mb + 1)},
        batch_decode_s={b: cost.decode_time(spec, r.shape, b) for b in range(2, mb + 1)},
        latent_gpus=tuple(st.latent_gpus),
        move_s={n: _move_s(state, st, node) for n, node in enumerate(cluster.nodes)},
        sp_prev=st.sp, was_running=st.id in state.just_paused,
        act_bytes={k: spec.activation_bytes(r.shape, k) for k in degrees},
        latent_bytes=spec.latent_bytes(r.shape), ready_in=ready_in, steps_done=st.steps_done,
        embed_s=cost.transfer_time(spec.embedding_bytes(), cluster.slowest_node_link),
        csp_key=csp_key or "", patches=patch_count(spec, r.shape) if csp_key else 0)


def _move_s(state: PlannerState, st: RequestStatus, node: tuple[int, ...]) -> float:
    """Seconds to move the request's latent onto another block of ``node``."""
    if st.steps_done == 0 or not st.latent_gpus:
        return 0.0
    others = [g for g in node if g not in st.latent_gpus]
    if not others:
        return 0.0
    bw = state.cluster.transfer_bandwidth(st.latent_gpus, (others[0],))
    return state.cost.transfer_time(st.request.spec.latent_bytes(st.request.shape), bw)


def save_problems(path: str | Path, problems: Iterable[RoundProblem]) -> int:
    """Write problems as JSON Lines; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.to_dict(), separators=(",", ":")) + "\n")
            n += 1
    return n


def load_problems(path: str | Path) -> list[RoundProblem]:
    return [RoundProblem.from_dict(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
