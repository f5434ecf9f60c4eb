"""Generate the Python gRPC stubs of ``proto/ditplan/v1/planner.proto``.

The stubs are committed under ``planner/service/gen/`` so the package works
without grpcio-tools; ``tests/test_service_proto.py`` regenerates them into a
temporary folder and fails when the committed ones are stale. Refresh with::

    python -m ditplan.planner.service.protogen

grpc_tools writes ``ditplan/v1/planner_pb2{,_grpc}.py`` with an absolute
``from ditplan.v1 import planner_pb2``; the only post-processing turns that
into a relative import, so the stubs live inside this package while the
descriptor keeps its canonical name ``ditplan/v1/planner.proto`` (what
server reflection shows).
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTO = "ditplan/v1/planner.proto"
GEN_DIR = Path(__file__).resolve().parent / "gen"
STUBS = ("planner_pb2.py", "planner_pb2_grpc.py")

_ABS_IMPORT = re.compile(r"^from ditplan\.v1 import (planner_pb2 as \w+)$", re.M)


def generate(out_dir: str | Path, proto_root: str | Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (grpc_tools, in a child process) on the contract; write the stubs into ``out_dir``.

    A child process, because grpc_tools' bundled C++ protobuf aborts when it is
    loaded next to another one (ortools') in the same process.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # grpc_tools.protoc's __main__ adds its bundled well-known protos to the include path.
        args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}", str(Path(proto_root) / PROTO)]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"protoc failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr}")
        written = []
        for name in STUBS:
            text = (Path(tmp) / "ditplan" / "v1" / name).read_text()
            text = _ABS_IMPORT.sub(r"from . import \1", text)
            dest = out_dir / name
            dest.write_text(text)
            written.append(dest)
    return written


def main() -> None:
    for path in generate(GEN_DIR):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
