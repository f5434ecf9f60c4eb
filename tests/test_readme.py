"""The README's service walkthrough works as written, pasted into a fresh shell."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_service_walkthrough_runs_as_pasted(tmp_path):
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```bash\n(ditplan serve --simulate.*?)```", text, re.S)
    assert m, "the README has no service walkthrough"
    port, metrics = _free_port(), _free_port()
    # Only the ports change (tests run in parallel); `kill %1` needs an interactive shell's job control.
    script = (m.group(1).replace("--metrics-port 9100 &", f"--metrics-port {metrics} --port {port} > serve.log 2>&1 &")
              .replace("kill %1", "kill $!"))
    assert f"--port {port}" in script and "kill $!" in script
    # The console script sits beside this interpreter (make test runs .venv/bin/python without activating).
    env = dict(os.environ, DITPLAN_SERVER=f"127.0.0.1:{port}",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out + (tmp_path / "serve.log").read_text()
    assert "submitted 40 requests" in out and "submitted 1 requests" in out
    assert re.search(r"cancelled long at step \d+/50", out)
    assert '"state": "cancelled"' in out
