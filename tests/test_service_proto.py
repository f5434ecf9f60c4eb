"""The committed gRPC stubs match the .proto (regenerated with the pinned grpcio-tools)."""
from pathlib import Path

from ditplan.planner.service.protogen import GEN_DIR, STUBS, generate


def test_committed_stubs_are_fresh(tmp_path: Path):
    generate(tmp_path)
    for name in STUBS:
        fresh, committed = (tmp_path / name).read_text(), (GEN_DIR / name).read_text()
        assert fresh == committed, (f"planner/service/gen/{name} is stale: run `python -m ditplan.planner.service.protogen` "
                                    "after editing proto/ditplan/v1/planner.proto")


def test_stubs_load_under_their_canonical_proto_name():
    from ditplan.planner.service.gen import planner_pb2, planner_pb2_grpc

    assert planner_pb2.DESCRIPTOR.name == "ditplan/v1/planner.proto"
    assert planner_pb2.DESCRIPTOR.package == "ditplan.v1"
    assert hasattr(planner_pb2_grpc, "PlannerStub") and hasattr(planner_pb2_grpc, "add_PlannerServicer_to_server")
    methods = {m.name for m in planner_pb2.DESCRIPTOR.services_by_name["Planner"].methods}
    assert {"Submit", "Cancel", "GetRequest", "ListRequests", "StreamPlans", "ReportProgress", "Plan",
            "WhatIf"} <= methods
