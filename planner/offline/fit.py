"""What fits, for the bound and the schedule alike: SP degrees with a block on the cluster, and memory."""
from __future__ import annotations

from typing import Sequence

from ditplan.models.catalog import Shape, get_model
from ditplan.planner.cluster import Cluster
from ditplan.planner.placement import fits_everywhere
from ditplan.planner.request import Request


def served_weight_bytes(requests: Sequence[Request], cluster: Cluster) -> int:
    """Weights of every model in the trace, when they fit together (then they stay on every GPU);
    0 when they do not: the bound then lets each GPU hold the model it runs, loaded for free
    (a relaxation of placement, so still an upper bound)."""
    models = sorted({r.model for r in requests})
    return sum(get_model(m).weight_bytes for m in models) if fits_everywhere(models, cluster, requests) else 0


def fits(model, shape: Shape, k: int, batch: int, weights: int, memory: int) -> bool:
    """Whether ``batch`` requests of ``shape`` at degree ``k`` fit ``memory`` beside the served weights."""
    return max(weights, model.weight_bytes) + model.activation_bytes(shape, k, batch) <= memory


def degrees(model, cluster: Cluster) -> list[int]:
    """The model's SP degrees that have an aligned block on ``cluster``."""
    return [k for k in model.sp_degrees(cluster.max_node_gpus) if cluster.blocks(k)]
