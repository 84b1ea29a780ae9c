"""The device runtime must not pull in torch or transformers (it installs without them)."""

import subprocess

from tests.conftest import PYTHON, ROOT, subprocess_env

PROBE = """
import importlib, pkgutil, sys
import moe2edge.runtime
for m in pkgutil.walk_packages(moe2edge.runtime.__path__, "moe2edge.runtime."):
    importlib.import_module(m.name)
from moe2edge.runtime.generate import Generator
gen = Generator.from_bundle(sys.argv[1])
reply = gen.generate("turn on the kitchen lights")
others = ("moe2edge.distill", "moe2edge.export", "moe2edge.jetson", "moe2edge.cli", "moe2edge.demo")
ours = sorted(n for n in sys.modules if n.startswith(others) or n.split(".")[0] in {"distill", "export", "runtime", "jetson"})
heavy = sorted(n for n in ("torch", "transformers", "optimum") if n in sys.modules)
print(repr((ours, heavy, len(reply.token_ids))))
"""


def test_runtime_imports_and_runs_without_torch(tiny_run):
    proc = subprocess.run(
        [PYTHON, "-c", PROBE, str(tiny_run["bundle"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ours, heavy, generated = eval(proc.stdout.strip().splitlines()[-1])
    assert heavy == [], f"runtime imported {heavy}"
    assert ours == [], f"runtime imported other moe2edge packages: {ours}"
    assert generated >= 1
