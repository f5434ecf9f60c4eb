"""The planner side must import and run with torch absent."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name.split(".")[0] in ("diffusers", "yunchang", "xfuser"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import pkgutil, importlib
import ditplan.models, ditplan.planner
for pkg in (ditplan.models, ditplan.planner):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if info.name.startswith("ditplan.models.torch"):
            continue
        importlib.import_module(info.name)
from ditplan.planner.cli import app
from typer.testing import CliRunner
r = CliRunner().invoke(app, ["whatif", "--workload", "tetriserve-uniform", "--n", "12", "--policy", "fcfs-sp2", "--no-plot"])
assert r.exit_code == 0, r.output
assert "torch" not in sys.modules
print("ok")
"""


def test_planner_imports_and_runs_without_torch():
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
