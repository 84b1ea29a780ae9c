"""`moe2edge jetson ...` in-process through moe2edge.cli.main and once as a subprocess, with
doctor and deployment against the fixture trees and stand-in executables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from moe2edge.cli import main
from moe2edge.jetson import deploy, doctor
from moe2edge.jetson.errors import JetsonError

REPO = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "jetson"
PLAN_KEYS = (
    "weights_gb",
    "kv_cache_gb",
    "fits",
    "decode_tok_s",
    "ttft_ms",
    "energy_j_per_token",
    "voice_reply_ms",
)


@pytest.fixture
def device(monkeypatch, tmp_path):
    def use(name: str) -> Path:
        root = FIX / name
        monkeypatch.setenv(
            "PATH", f"{FIX / 'bin'}{os.pathsep}{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
        )
        monkeypatch.setenv("FAKE_NVPMODEL_CONF", str(root / "etc/nvpmodel.conf"))
        monkeypatch.setenv("FAKE_NVPMODEL_STATE", str(tmp_path / "nvpmodel-state"))
        monkeypatch.setenv("FAKE_TEGRASTATS_BOARD", "nx" if "nx" in name else "agx")
        return root

    return use


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_json(capsys):
    rc, out, _ = run(
        capsys,
        "jetson",
        "plan",
        "--model",
        "dense-13b",
        "--precision",
        "int4",
        "--module",
        "agx-orin-64gb",
        "--mode",
        "30W",
        "--json",
    )
    data = json.loads(out)
    assert rc == 0 and all(k in data for k in PLAN_KEYS)
    assert data["fits"] is True and data["mode"] == "30W"


def test_plan_text_and_compare(capsys):
    rc, out, _ = run(capsys, "jetson", "plan")
    assert rc == 0 and "voice reply" in out
    rc, out, _ = run(capsys, "jetson", "plan", "--compare-published")
    assert rc == 0 and "Qwen3-8B" in out and "llama.cpp" in out


def test_plan_not_fitting_exits_1(capsys):
    rc, out, _ = run(
        capsys, "jetson", "plan", "--module", "orin-nx-16gb", "--mode", "15W", "--precision", "fp16"
    )
    assert rc == 1 and "fits: NO" in out


def test_plan_with_device_conf(capsys):
    rc, out, _ = run(
        capsys,
        "jetson",
        "plan",
        "--nvpmodel-conf",
        str(FIX / "agx-orin-jp6/etc/nvpmodel.conf"),
        "--mode",
        "1",
        "--json",
    )
    data = json.loads(out)
    assert (
        rc == 0 and data["mode"] == "15W" and data["bandwidth_gbs"] == pytest.approx(136.5, abs=0.1)
    )


def test_bad_model_is_a_clean_error(capsys):
    rc, _, err = run(capsys, "jetson", "plan", "--model", "nope")
    assert rc == 2 and err.startswith("moe2edge: error: unknown model")


def test_plan_subprocess():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe2edge.cli",
            "jetson",
            "plan",
            "--model",
            "dense-13b",
            "--precision",
            "int4",
            "--module",
            "agx-orin-64gb",
            "--mode",
            "30W",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert all(k in json.loads(proc.stdout) for k in PLAN_KEYS)


@pytest.mark.parametrize("name", ["agx-orin-jp6", "agx-orin-iio", "orin-nx-jp6"])
def test_modes_mode_power(device, capsys, name):
    root = str(device(name))
    rc, out, _ = run(capsys, "jetson", "modes", "--root", root, "--json")
    modes = json.loads(out)["modes"]
    assert rc == 0 and len(modes) == 4 and all("gpu_tpcs" in m for m in modes)
    rc, out, _ = run(capsys, "jetson", "mode", "--root", root, "--json")
    assert rc == 0 and json.loads(out)["id"] == 2
    rc, out, _ = run(capsys, "jetson", "mode", "--root", root, "--set", "1")
    assert rc == 0 and "now 1" in out
    rc, out, _ = run(
        capsys, "jetson", "power", "--root", root, "--seconds", "0.2", "--rate", "20", "--json"
    )
    data = json.loads(out)
    assert rc == 0 and data["samples"] >= 2
    assert data["total_w"]["mean"] == pytest.approx(7.0 if "nx" in name else 23.52)


def test_power_from_tegrastats(device, capsys):
    root = str(device("agx-orin-jp6"))
    rc, out, _ = run(
        capsys,
        "jetson",
        "power",
        "--root",
        root,
        "--source",
        "tegrastats",
        "--seconds",
        "0.2",
        "--rate",
        "20",
        "--json",
    )
    data = json.loads(out)
    assert rc == 0 and data["source"] == "tegrastats" and "VDD_GPU_SOC" in data["rails_w"]


def test_mode_set_as_non_root(device, capsys, monkeypatch):
    root = str(device("agx-orin-jp6"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    rc, _, err = run(capsys, "jetson", "mode", "--root", root, "--set", "30W")
    assert rc == 2 and "needs root" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["modes"],
        ["mode"],
        ["power", "--seconds", "0.1"],
        ["doctor"],
        ["install-service", "--bundle", "."],
        ["build-engine", "."],
    ],
)
def test_every_device_command_refuses_off_jetson(device, capsys, argv):
    root = str(device("not-jetson"))
    rc, _, err = run(capsys, "jetson", *argv[:1], "--root", root, *argv[1:])
    assert rc == 2 and "not a Jetson" in err, err


def test_doctor_agx_and_nx(device, capsys, monkeypatch):
    fake_ort = types.SimpleNamespace(
        __version__="1.20.0",
        get_available_providers=lambda: [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    root = str(device("agx-orin-jp6"))
    rc, out, _ = run(capsys, "jetson", "doctor", "--root", root, "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rc == 0
    assert rows["board"]["status"] == "ok" and "agx-orin-64gb" in rows["board"]["value"]
    assert rows["L4T / JetPack"]["value"] == "L4T 36.3.0 / JetPack 6.0"
    assert rows["TensorRT"]["status"] == "ok" and rows["onnxruntime"]["status"] == "ok"
    assert rows["power mode"]["status"] == "ok" and "MODE_30W" in rows["power mode"]["value"]
    assert rows["swap"]["status"] == "warn"  # the AGX fixture has no swap
    assert rows["power telemetry"]["value"].startswith("hwmon: 23.5 W")

    root = str(device("orin-nx-jp6"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    rc, out, _ = run(capsys, "jetson", "doctor", "--root", root)
    assert rc == 1 and "[fail] TensorRT" in out and "orin-nx-16gb" in out and "VDD_IN" in out


def test_doctor_old_jetpack_and_library_only(device, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    rows = {
        r.name: r
        for r in doctor.run_doctor(device("agx-orin-iio"), FIX / "agx-orin-iio/etc/nvpmodel.conf")
    }
    assert rows["L4T / JetPack"].status == "warn" and "JetPack 6" in rows["L4T / JetPack"].hint
    assert rows["power telemetry"].value.startswith("iio")
    tr = doctor.check_tensorrt(FIX / "agx-orin-jp6")  # libnvinfer.so.10.3.0 without bindings
    assert tr.status == "warn" and "10.3.0" in tr.value


def make_bundle(tmp_path: Path) -> Path:
    from moe2edge.runtime.manifest import write_manifest

    b = tmp_path / "bundle"
    b.mkdir()
    (b / "model.onnx").write_bytes(b"x" * 1000)
    write_manifest(
        b,
        {
            "model": {},
            "io": {"inputs": []},
            "precision": "int4",
            "files": ["model.onnx"],
            "generation": {},
        },
    )
    return b


def test_install_service(device, capsys, tmp_path):
    root = str(device("agx-orin-jp6"))
    bundle = make_bundle(tmp_path)
    rc, out, _ = run(
        capsys, "jetson", "install-service", "--root", root, "--bundle", str(bundle), "--dry-run"
    )
    assert (
        rc == 0
        and "ExecStartPre=+" in out
        and " -m 2" in out
        and "MOE2EDGE_POWER_BUDGET_W=30" in out
    )
    # a stand-in systemctl that records its calls
    log = tmp_path / "systemctl.log"
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    path, text = deploy.install_service(
        bundle,
        "15W",
        root=Path(root),
        conf_path=Path(root) / "etc/nvpmodel.conf",
        unit_dir=tmp_path / "units",
        systemctl=str(fake),
        euid=0,
    )
    assert path.read_text() == text and "-m 1" in text and f"serve {bundle.resolve()}" in text
    assert log.read_text().splitlines() == ["daemon-reload", "enable --now moe2edge.service"]
    with pytest.raises(JetsonError, match="needs root"):
        deploy.install_service(
            bundle,
            root=Path(root),
            conf_path=Path(root) / "etc/nvpmodel.conf",
            unit_dir=tmp_path / "units",
            euid=1000,
        )
    with pytest.raises(JetsonError, match="not a bundle"):
        deploy.install_service(
            tmp_path, root=Path(root), conf_path=Path(root) / "etc/nvpmodel.conf", dry_run=True
        )


def test_build_engine_checks_memory_then_needs_tensorrt(device, capsys, tmp_path, monkeypatch):
    root = device("agx-orin-jp6")
    bundle = make_bundle(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    rc, _, err = run(capsys, "jetson", "build-engine", str(bundle), "--root", str(root))
    assert rc == 2 and "TensorRT is not installed; engines are built on the target device" in err
    with pytest.raises(JetsonError, match="only .* GB of RAM \\+ swap is free"):
        deploy.check_build_memory(40 * 10**9, 1 << 30, root)  # 120 GB needed on a 64 GB module
    info = deploy.check_build_memory(10**9, 1 << 30, root)
    assert info["needed_gb"] == pytest.approx(3 + 1.07, abs=0.01)


def test_governor_sim_command(capsys):
    rc, out, _ = run(capsys, "jetson", "governor-sim", "--duration", "30", "--json")
    rows = json.loads(out)
    assert rc == 0 and len(rows) == 5 and all(r["max_rolling_w"] <= 30 for r in rows)
