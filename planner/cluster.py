"""The GPU cluster: a networkx topology built from a short spec or a JSON file.

Short form: ``8xH100`` (one node of 8), ``2x8xL20`` (nodes x GPUs x kind).
JSON form::

    {"nodes": [{"kind": "A40", "gpus": 4, "memory_gib": 48,
                "nvlink": [[0, 1], [2, 3]], "nvlink_gbps": 56.25, "pcie_gbps": 32}],
     "internode_gbps": 25}

``nvlink`` is ``"all-to-all"`` (NVSwitch), a list of local GPU pairs, or
``"none"`` (PCIe only); it defaults to the GPU kind's own link. GPUs are
numbered 0..N-1 across the cluster, node by node. SP groups are aligned blocks
of k in {1, 2, 4, 8} GPUs inside one node; a block's speed is set by its
slowest link.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import networkx as nx

from ditplan.models.catalog import SP_DEGREES
from ditplan.models.gpus import GPU_KINDS, GiB, GpuKind
from ditplan.planner.errors import ClusterSpecError

SHORT_SPEC = re.compile(r"^\s*(?:(\d+)\s*x\s*)?(\d+)\s*x\s*([A-Za-z0-9]+)\s*$")


@dataclass(frozen=True)
class Gpu:
    index: int  # global
    node: int
    local: int
    kind: GpuKind
    memory: int  # bytes


class Cluster:
    def __init__(self, graph: nx.Graph, nodes: list[list[int]], name: str) -> None:
        self.graph = graph
        self.name = name
        self.nodes: tuple[tuple[int, ...], ...] = tuple(tuple(n) for n in nodes)
        self.gpus: tuple[Gpu, ...] = tuple(graph.nodes[i]["gpu"] for i in range(graph.number_of_nodes()))
        kinds = {g.kind.name for g in self.gpus}
        if len(kinds) != 1:
            raise ClusterSpecError(f"cluster {name!r}: mixed GPU kinds {sorted(kinds)} are not supported yet")
        self.kind: GpuKind = self.gpus[0].kind
        self._blocks: dict[int, tuple[tuple[int, ...], ...]] = {}
        self._bw: dict[tuple[int, ...], float] = {}

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, {len(self.gpus)} GPUs)"

    @property
    def size(self) -> int:
        return len(self.gpus)

    @cached_property
    def max_node_gpus(self) -> int:
        return max(len(n) for n in self.nodes)

    def node_of(self, gpu: int) -> int:
        return self.gpus[gpu].node

    @cached_property
    def slowest_node_link(self) -> float:
        """The slowest link between two GPUs of one node (inf when every node has one GPU)."""
        return min((self.link_bandwidth(a, b) for node in self.nodes for i, a in enumerate(node)
                    for b in node[i + 1:]), default=math.inf)

    def blocks(self, k: int) -> tuple[tuple[int, ...], ...]:
        """Every aligned block of ``k`` GPUs inside one node (buddy blocks)."""
        if k not in self._blocks:
            out = []
            for node in self.nodes:
                for start in range(0, len(node) - k + 1, k):
                    out.append(node[start:start + k])
            self._blocks[k] = tuple(out)
        return self._blocks[k]

    def is_block(self, gpus: tuple[int, ...]) -> bool:
        k = len(gpus)
        return k in SP_DEGREES and tuple(gpus) in set(self.blocks(k))

    def block_bandwidth(self, gpus: tuple[int, ...]) -> float:
        """Slowest link between any two GPUs of a block (inf for one GPU)."""
        key = tuple(gpus)
        if key not in self._bw:
            bw = math.inf
            for i, a in enumerate(key):
                for b in key[i + 1:]:
                    bw = min(bw, self.link_bandwidth(a, b))
            self._bw[key] = bw
        return self._bw[key]

    def link_bandwidth(self, a: int, b: int) -> float:
        if a == b:
            return math.inf
        data = self.graph.get_edge_data(a, b)
        if data is not None:
            return data["bandwidth"]
        # No direct edge: the best path's bottleneck (NIC-to-NIC across nodes).
        return min(self.graph.edges[u, v]["bandwidth"]
                   for u, v in nx.utils.pairwise(nx.shortest_path(self.graph, a, b)))

    def transfer_bandwidth(self, src: tuple[int, ...], dst: tuple[int, ...]) -> float:
        """Bandwidth for moving a latent from group ``src`` to group ``dst`` (best link)."""
        pairs = [(a, b) for a in src for b in dst if a != b]
        if not src or set(src) == set(dst) or not pairs:
            return math.inf
        return max(self.link_bandwidth(a, b) for a, b in pairs)

class DeploymentView(Cluster):
    """The cluster as one deployment of a static placement sees it: the same GPUs and links, but
    SP blocks only inside the deployment's GPUs, so a peer never waits for a block it does not own."""

    def __init__(self, base: Cluster, gpus) -> None:
        self.__dict__.update({k: v for k, v in base.__dict__.items() if k != "max_node_gpus"})
        self._mine = frozenset(gpus)
        self._own_blocks: dict[int, tuple[tuple[int, ...], ...]] = {}

    def blocks(self, k: int) -> tuple[tuple[int, ...], ...]:
        if k not in self._own_blocks:
            self._own_blocks[k] = tuple(b for b in Cluster.blocks(self, k) if self._mine.issuperset(b))
        return self._own_blocks[k]

    @property
    def max_node_gpus(self) -> int:  # the widest SP degree the deployment has a block for
        return max((k for k in SP_DEGREES if self.blocks(k)), default=1)


def _node_links(kind: GpuKind, n: int, nvlink, nvlink_bw: float, pcie_bw: float, where: str):
    """Edges (a, b, bandwidth, link) among local GPUs 0..n-1 of a node."""
    if nvlink is None:
        nvlink = {"nvswitch": "all-to-all", "nvlink-pairs": [[i, i + 1] for i in range(0, n - 1, 2)],
                  "pcie": "none"}[kind.link]
    fast: set[tuple[int, int]] = set()
    if nvlink == "all-to-all":
        fast = {(a, b) for a in range(n) for b in range(a + 1, n)}
    elif nvlink == "none":
        fast = set()
    elif isinstance(nvlink, list):
        for pair in nvlink:
            if (not isinstance(pair, list) or len(pair) != 2
                    or not all(isinstance(x, int) and 0 <= x < n for x in pair) or pair[0] == pair[1]):
                raise ClusterSpecError(f"{where}: field 'nvlink' has a bad pair {pair!r} (local GPU indices 0..{n - 1})")
            fast.add((min(pair), max(pair)))
    else:
        raise ClusterSpecError(f"{where}: field 'nvlink' = {nvlink!r} must be 'all-to-all', 'none' or a list of pairs")
    for a in range(n):
        for b in range(a + 1, n):
            if (a, b) in fast:
                yield a, b, nvlink_bw, "nvlink"
            else:
                yield a, b, pcie_bw, "pcie"


# The fields a cluster JSON may hold; anything else is refused (a typo must not silently mean "default").
TOP_FIELDS = ("nodes", "internode_gbps")
NODE_FIELDS = ("kind", "gpus", "memory_gib", "nvlink", "nvlink_gbps", "pcie_gbps")


def _check_fields(obj: dict, known: tuple[str, ...], where: str) -> None:
    """Refuse keys of ``obj`` outside ``known``, naming each (with the close match, if any) and the known ones."""
    unknown = [k for k in obj if k not in known]
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    noun = "field" if len(unknown) == 1 else "fields"
    raise ClusterSpecError(f"{where}: unknown {noun} {', '.join(parts)}; known: {', '.join(sorted(known))}")


def build_cluster(nodes: list[dict], internode_bw: float, name: str) -> Cluster:
    graph = nx.Graph()
    index_lists: list[list[int]] = []
    gid = 0
    for ni, node in enumerate(nodes):
        where = f"cluster {name!r}: nodes[{ni}]"
        if not isinstance(node, dict):
            raise ClusterSpecError(f"{where}: must be an object with fields {', '.join(NODE_FIELDS)}, "
                                   f"got {node!r}")
        _check_fields(node, NODE_FIELDS, where)
        kind_name = node.get("kind")
        if not isinstance(kind_name, str) or kind_name.upper() not in GPU_KINDS:
            raise ClusterSpecError(f"{where}: field 'kind' = {kind_name!r} is not one of {sorted(GPU_KINDS)}")
        kind = GPU_KINDS[kind_name.upper()]
        n = node.get("gpus")
        if not isinstance(n, int) or isinstance(n, bool) or n not in SP_DEGREES:
            raise ClusterSpecError(f"{where}: field 'gpus' = {n!r} must be 1, 2, 4 or 8")
        mem = node.get("memory_gib", kind.memory / GiB)
        if not isinstance(mem, (int, float)) or mem <= 0:
            raise ClusterSpecError(f"{where}: field 'memory_gib' = {mem!r} must be > 0")
        bws = []
        for key, default in (("nvlink_gbps", kind.link_bw / 1e9), ("pcie_gbps", kind.pcie_bw / 1e9)):
            bw = node.get(key, default)
            if not isinstance(bw, (int, float)) or isinstance(bw, bool) or not bw > 0:
                raise ClusterSpecError(f"{where}: field {key!r} = {bw!r} must be a number > 0")
            bws.append(float(bw) * 1e9)
        nv_bw, pcie_bw = bws
        ids = list(range(gid, gid + n))
        for local, g in enumerate(ids):
            graph.add_node(g, gpu=Gpu(g, ni, local, kind, int(mem * GiB)))
        for a, b, bw, link in _node_links(kind, n, node.get("nvlink"), nv_bw, pcie_bw, where):
            graph.add_edge(ids[a], ids[b], bandwidth=bw, link=link)
        index_lists.append(ids)
        gid += n
    if not index_lists:
        raise ClusterSpecError(f"cluster {name!r}: field 'nodes' is empty")
    # Inter-node: every GPU's NIC reaches every GPU of every other node.
    for i, a_ids in enumerate(index_lists):
        for b_ids in index_lists[i + 1:]:
            for a in a_ids:
                for b in b_ids:
                    graph.add_edge(a, b, bandwidth=internode_bw, link="network")
    return Cluster(graph, index_lists, name)


def parse_cluster(spec: str) -> Cluster:
    """A cluster from ``NxKIND``, ``MxNxKIND`` or a JSON file path."""
    if not isinstance(spec, str) or not spec.strip():
        raise ClusterSpecError(f"cluster spec {spec!r} is empty; use e.g. 8xH100, 2x8xL20 or a JSON file")
    m = SHORT_SPEC.match(spec)
    if m:
        n_nodes, per_node, kind = int(m.group(1) or 1), int(m.group(2)), m.group(3)
        if kind.upper() not in GPU_KINDS:
            raise ClusterSpecError(f"cluster spec {spec!r}: GPU kind {kind!r} is not one of {sorted(GPU_KINDS)}")
        if n_nodes < 1:
            raise ClusterSpecError(f"cluster spec {spec!r}: node count {n_nodes} must be >= 1")
        if per_node not in SP_DEGREES:
            raise ClusterSpecError(f"cluster spec {spec!r}: GPUs per node {per_node} must be 1, 2, 4 or 8")
        gk = GPU_KINDS[kind.upper()]
        return build_cluster([{"kind": gk.name, "gpus": per_node}] * n_nodes, gk.internode_bw, spec.strip())
    path = Path(spec)
    if not path.exists():
        raise ClusterSpecError(f"cluster spec {spec!r} is neither NxKIND / MxNxKIND nor an existing JSON file")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ClusterSpecError(f"cluster file {spec!r}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return parse_cluster_doc(doc, path.name)


def parse_cluster_doc(doc: object, name: str) -> Cluster:
    """A cluster from the cluster JSON contract, already decoded (docs/architecture.md, Contracts)."""
    if isinstance(doc, dict):
        _check_fields(doc, TOP_FIELDS, f"cluster {name!r}: top level")
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise ClusterSpecError(f"cluster {name!r}: field 'nodes' must be a list of nodes")
    inter = doc.get("internode_gbps", 50)
    if not isinstance(inter, (int, float)) or isinstance(inter, bool) or not inter > 0:
        raise ClusterSpecError(f"cluster {name!r}: field 'internode_gbps' = {inter!r} must be > 0")
    return build_cluster(doc["nodes"], float(inter) * 1e9, name)
