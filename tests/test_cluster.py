import json
import math

import pytest

from ditplan.planner.cluster import parse_cluster
from ditplan.planner.errors import ClusterSpecError


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


# --- strict configuration: an unknown field is an error, never a silent default -------------
@pytest.mark.parametrize("doc,where,field,close", [
    ({"nodes": [{"kind": "H100", "gpus": 8, "memory_gb": 40}]}, "nodes[0]", "memory_gb", "memory_gib"),
    ({"nodes": [{"kind": "A40", "gpus": 4}, {"kind": "A40", "gpus": 4, "nvlinks": "none"}]}, "nodes[1]",
     "nvlinks", "nvlink"),
    ({"nodes": [{"kind": "H100", "gpus": 8}], "internode_gpbs": 25}, "top level", "internode_gpbs",
     "internode_gbps"),
    ({"node": [{"kind": "H100", "gpus": 8}]}, "top level", "node", "nodes"),
    ({"nodes": [{"kind": "H100", "gpus": 8, "owner": "me"}]}, "nodes[0]", "owner", None),
])
def test_unknown_fields_are_refused_naming_field_place_and_known_ones(tmp_path, doc, where, field, close):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ClusterSpecError) as info:
        parse_cluster(str(p))
    msg = str(info.value)
    assert f"{where}: unknown field {field!r}" in msg and "\n" not in msg
    known = "internode_gbps, nodes" if where == "top level" else "gpus, kind, memory_gib, nvlink, nvlink_gbps, pcie_gbps"
    assert msg.endswith(f"known: {known}")
    assert (f"did you mean {close!r}?" in msg) if close else "did you mean" not in msg


def test_every_unknown_field_of_a_node_is_named(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"nodes": [{"kind": "H100", "gpus": 8, "memory_gb": 80, "pcie": 16}]}))
    with pytest.raises(ClusterSpecError, match=r"unknown fields 'memory_gb' \(did you mean 'memory_gib'\?\), "
                                               r"'pcie' \(did you mean 'pcie_gbps'\?\)"):
        parse_cluster(str(p))


@pytest.mark.parametrize("doc,needle", [
    ({"nodes": [3]}, r"nodes\[0\]: must be an object"),
    ({"nodes": [{"kind": "H100", "gpus": 8, "pcie_gbps": "fast"}]}, r"field 'pcie_gbps' = 'fast' must be a number > 0"),
    ({"nodes": [{"kind": "H100", "gpus": 8, "nvlink_gbps": 0}]}, r"field 'nvlink_gbps' = 0 must be a number > 0"),
])
def test_bad_node_values_are_input_errors(tmp_path, doc, needle):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ClusterSpecError, match=needle):
        parse_cluster(str(p))


def test_every_known_field_is_still_accepted(tmp_path):
    doc = {"nodes": [{"kind": "A40", "gpus": 4, "memory_gib": 48, "nvlink": [[0, 1], [2, 3]], "nvlink_gbps": 56.25,
                      "pcie_gbps": 32}], "internode_gbps": 25}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    assert parse_cluster(str(p)).size == 4


@pytest.mark.parametrize("command", ["whatif", "serve"])
def test_the_cli_refuses_an_unknown_cluster_field_with_exit_2(tmp_path, command):
    from typer.testing import CliRunner

    from ditplan.planner.cli import app

    p = tmp_path / "c.json"
    p.write_text(json.dumps({"nodes": [{"kind": "H100", "gpus": 8, "memory_gb": 80}]}))
    args = {"whatif": ["whatif", "--workload", "tetriserve-uniform", "--n", "3", "--no-plot"],
            "serve": ["serve", "--port", "0", "--state-dir", str(tmp_path / "state"), "--no-planner-process"]}[command]
    r = CliRunner().invoke(app, args + ["--cluster", str(p)])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "nodes[0]: unknown field 'memory_gb' (did you mean 'memory_gib'?)" in lines[0], r.output
    assert "Traceback" not in r.output


def test_a_decoded_cluster_document_parses_like_its_file(tmp_path):
    from ditplan.planner.cluster import parse_cluster_doc
    doc = {"nodes": [{"kind": "L20", "gpus": 4}, {"kind": "L20", "gpus": 4, "nvlink": "none"}], "internode_gbps": 25}
    path = tmp_path / "two.json"
    path.write_text(json.dumps(doc))
    a, b = parse_cluster_doc(doc, "two.json"), parse_cluster(str(path))
    assert (a.name, a.size, a.nodes) == (b.name, b.size, b.nodes)
    assert sorted(a.graph.edges(data=True)) == sorted(b.graph.edges(data=True))
    with pytest.raises(ClusterSpecError, match=r"cluster 'x': field 'internode_gbps' = 0 must be > 0"):
        parse_cluster_doc({"nodes": doc["nodes"], "internode_gbps": 0}, "x")
    with pytest.raises(ClusterSpecError, match=r"cluster 'x': top level: unknown field 'node' \(did you mean 'nodes'\?\)"):
        parse_cluster_doc({"node": []}, "x")
