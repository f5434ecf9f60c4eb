import json
import math

import pytest

from planner.cluster import parse_cluster
from planner.errors import ClusterSpecError


def test_short_forms():
    c = parse_cluster("8xH100")
    assert c.size == 8 and c.kind.name == "H100" and len(c.nodes) == 1
    c = parse_cluster("2x8xL20")
    assert c.size == 16 and c.nodes[1] == tuple(range(8, 16))
    assert c.blocks(8) == (tuple(range(8)), tuple(range(8, 16)))
    assert c.blocks(2)[:2] == ((0, 1), (2, 3))


def test_blocks_are_aligned_and_never_cross_nodes():
    c = parse_cluster("2x4xA40")
    assert c.is_block((4, 5, 6, 7)) and not c.is_block((2, 3, 4, 5)) and not c.is_block((1, 2))
    assert all(len({c.node_of(g) for g in b}) == 1 for k in (1, 2, 4) for b in c.blocks(k))


def test_link_bandwidths_follow_the_topology():
    a40 = parse_cluster("4xA40")  # NVLink bridges on pairs, PCIe otherwise
    assert a40.block_bandwidth((0, 1)) == pytest.approx(56.25e9)
    assert a40.block_bandwidth((0, 1, 2, 3)) == pytest.approx(32e9)
    h = parse_cluster("2x8xH100")
    assert h.block_bandwidth(tuple(range(8))) == pytest.approx(450e9)
    assert h.transfer_bandwidth((0,), (8,)) == pytest.approx(50e9)
    assert h.transfer_bandwidth((0, 1), (0, 1)) == math.inf


def test_json_spec(tmp_path):
    spec = {"nodes": [{"kind": "A40", "gpus": 4, "nvlink": [[0, 1]], "memory_gib": 40}], "internode_gbps": 10}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(spec))
    c = parse_cluster(str(p))
    assert c.size == 4 and c.gpus[0].memory == 40 * 1024**3
    assert c.block_bandwidth((2, 3)) == pytest.approx(32e9)  # no NVLink on that pair


@pytest.mark.parametrize("spec,needle", [
    ("8xTPU", "'TPU'"), ("3xH100", "3 must be 1, 2, 4 or 8"), ("", "empty"),
    ("nonsense", "neither"),
])
def test_bad_short_specs_name_the_value(spec, needle):
    with pytest.raises(ClusterSpecError, match=needle):
        parse_cluster(spec)


@pytest.mark.parametrize("doc,needle", [
    ({"nodes": []}, "'nodes' is empty"),
    ({"nodes": [{"kind": "H100", "gpus": 3}]}, r"nodes\[0\]: field 'gpus' = 3"),
    ({"nodes": [{"kind": "X", "gpus": 8}]}, r"field 'kind' = 'X'"),
    ({"nodes": [{"kind": "A40", "gpus": 2, "nvlink": [[0, 5]]}]}, "bad pair"),
    ({"nodes": [{"kind": "H100", "gpus": 8, "memory_gib": -1}]}, "'memory_gib' = -1"),
    ({"nodes": [{"kind": "H100", "gpus": 8}, {"kind": "A40", "gpus": 4}]}, "mixed GPU kinds"),
])
def test_bad_json_specs_name_the_field(tmp_path, doc, needle):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ClusterSpecError, match=needle):
        parse_cluster(str(p))
