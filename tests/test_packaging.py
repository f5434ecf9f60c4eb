"""The distribution is one namespace (``ditplan.*``): the built wheel installs into a fresh venv and
runs from any directory, a user's own ``models.py`` included."""
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_is_one_namespace_and_runs_from_another_directory(tmp_path):
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    # Build from a copy: an in-tree build leaves build/ behind, whose stale files a later wheel could pick up.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "out", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
                   check=True, timeout=600, capture_output=True)
    (wheel,) = wheels.glob("ditplan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"ditplan", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                                                + ".dist-info"}
    assert "ditplan/proto/ditplan/v1/planner.proto" in names  # the gRPC contract ships with the code
    assert "ditplan/models/profiles/hetu-dit-l20.json" in names

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    site = subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    # The dependencies come from this environment's site-packages, put on the path without running its
    # .pth files, so this checkout's editable install stays out of the fresh venv.
    deps = [p for p in sys.path if p.endswith("site-packages")] or [sysconfig.get_paths()["purelib"]]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=300, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "models.py").write_text("raise SystemExit('a user module shadowed ditplan.models')\n")
    (elsewhere / "planner.py").write_text("raise SystemExit('a user module shadowed ditplan.planner')\n")
    r = subprocess.run([str(env / "bin" / "ditplan"), "whatif", "--workload", "tetriserve-uniform", "--n", "8",
                        "-p", "fcfs-sp2", "--no-plot"], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fcfs-sp2" in r.stdout
    where = subprocess.check_output([py, "-c", "import ditplan.planner; print(ditplan.planner.__file__)"],
                                    cwd=elsewhere, text=True)
    assert where.startswith(site)  # the installed wheel, not this checkout
