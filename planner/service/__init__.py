"""The ditplan gRPC planning service (``ditplan serve``), its client, and the executor contract."""
