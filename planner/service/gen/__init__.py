"""Generated gRPC stubs of proto/ditplan/v1/planner.proto (``python -m planner.service.protogen``)."""
