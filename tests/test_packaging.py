"""The wheel installs one top-level name, `moe2edge`; the import contracts hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROBE = """
import importlib.util, sys
assert importlib.util.find_spec("runtime") is None, "a top-level 'runtime' is importable"
import moe2edge
assert moe2edge.__file__.startswith(sys.argv[1]), moe2edge.__file__
from moe2edge.runtime import Generator
from moe2edge.runtime.server.app import create_app
heavy = sorted(n for n in ("torch", "transformers", "optimum", "onnx") if n in sys.modules)
assert not heavy, heavy
print("ok")
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = out.glob("moe2edge-*.whl")
    return found


def test_wheel_has_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"moe2edge"}
    for stage in ("distill", "export", "runtime", "jetson"):
        assert f"moe2edge/{stage}/__init__.py" in names
    assert "moe2edge/runtime/server/static/index.html" in names  # package data comes along
    assert "moe2edge/jetson/deploy/moe2edge.service" in names


def test_installed_wheel_runtime_needs_no_torch(wheel, tmp_path):
    """From the installed wheel (not the checkout): `import runtime` fails, the runtime imports."""
    target = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(target)],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_import_contracts_hold():
    """`lint-imports` (contracts in pyproject.toml): the stage rules and no cycles."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed (it is in the dev extra)"
    proc = subprocess.run(
        [exe, "--no-cache"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
