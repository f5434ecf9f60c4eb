"""What a policy sees at a planning instant: live requests, GPUs, costs.

The simulator and the service build it the same way; policies treat it as
read-only and answer with a RoundPlan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.placement import Placement
from ditplan.planner.request import RequestStatus, Stage


@dataclass
class PlannerState:
    now: float
    cluster: Cluster
    cost: CostModel
    requests: Sequence[RequestStatus]  # live requests, in arrival order
    gpu_free_at: Sequence[float]  # per GPU: end of its in-flight work (<= now: idle)
    # The weights each GPU holds (loads in progress included); a list of model
    # names means those models are replicated on every GPU.
    placement: Placement | Sequence[str]
    round_s: float = 2.0  # the planner's round length (target seconds of work per assignment)
    # Requests whose diffuse segment ended at this instant with steps left:
    # not continuing one of them now is a preemption.
    just_paused: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.placement, Placement):
            self.placement = Placement.replicate(self.cluster.size, tuple(self.placement))

    def idle_gpus(self) -> list[int]:
        return [g for g, t in enumerate(self.gpu_free_at) if t <= self.now]

    def waiting(self) -> list[RequestStatus]:
        """Live requests with no work in flight: the ones a plan can assign."""
        return [r for r in self.requests if not r.in_flight]

    # --- costs of a candidate assignment ------------------------------------
    def step_time(self, status: RequestStatus, gpus: tuple[int, ...], batch: int = 1) -> float:
        req = status.request
        bw = self.cluster.block_bandwidth(gpus) if len(gpus) > 1 else None
        return self.cost.step_time(req.spec, req.shape, len(gpus), batch, link_bw=bw)

    def migration_time(self, status: RequestStatus, gpus: tuple[int, ...]) -> float:
        """Seconds to bring the request's latent (or its prompt embeddings) onto ``gpus`` before diffusing."""
        return handoff_time(self.cluster, self.cost, status, Stage.DIFFUSE, gpus)

    def stage_time(self, status: RequestStatus, stage: Stage, batch: int = 1) -> float:
        req = status.request
        if stage is Stage.ENCODE:
            return self.cost.encode_time(req.spec, req.shape, batch)
        if stage is Stage.DECODE:
            return self.cost.decode_time(req.spec, req.shape, batch)
        raise ValueError("stage_time is for encode and decode; use step_time for diffuse")

    def min_step_time(self, status: RequestStatus) -> float:
        req = status.request
        return self.cost.min_step_time(req.spec, req.shape, self.cluster.max_node_gpus)

    def remaining_lower_bound(self, status: RequestStatus) -> float:
        """Fastest possible time to finish from here on an empty cluster."""
        req = status.request
        t = 0.0
        if not status.encoded:
            t += self.cost.encode_time(req.spec, req.shape)
        t += status.remaining_steps * self.min_step_time(status)
        return t + self.cost.decode_time(req.spec, req.shape)

    # --- memory -------------------------------------------------------------
    def weight_bytes(self) -> list[int]:
        """Per GPU: bytes of its resident weights."""
        return self.placement.weight_bytes_all()

    def resident_bytes(self) -> list[int]:
        """Per GPU: latents of paused requests kept there."""
        out = [0] * self.cluster.size
        for r in self.requests:
            if r.latent_gpus and r.steps_done > 0:
                share = r.request.spec.latent_bytes(r.request.shape) // len(r.latent_gpus)
                for g in r.latent_gpus:
                    out[g] += share
        return out


def handoff_time(cluster: Cluster, cost: CostModel, st: RequestStatus, stage: Stage,
                 gpus: Sequence[int]) -> float:
    """Seconds to bring what ``stage`` needs onto ``gpus`` from where the request's state lives.

    Diffuse: the latent after some steps (a migration), or the prompt
    embeddings from an encode on another GPU; decode: the latent, if it is
    decoded on a GPU outside the block that diffused it.
    """
    if not st.latent_gpus:
        return 0.0
    spec = st.request.spec
    if stage is Stage.DIFFUSE:
        if st.steps_done > 0 and set(st.latent_gpus) != set(gpus):
            size = spec.latent_bytes(st.request.shape)
        elif st.steps_done == 0 and st.encoded and not set(st.latent_gpus) & set(gpus):
            size = spec.embedding_bytes()
        else:
            return 0.0
    elif stage is Stage.DECODE and gpus[0] not in st.latent_gpus:
        size = spec.latent_bytes(st.request.shape)
    else:
        return 0.0
    return cost.transfer_time(size, cluster.transfer_bandwidth(st.latent_gpus, tuple(gpus)))
