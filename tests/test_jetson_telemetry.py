"""Power telemetry: INA3221 hwmon and iio sysfs fixtures, tegrastats lines and a stand-in
`tegrastats`, and a fake jetson-stats."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from moe2edge.jetson import telemetry
from moe2edge.jetson.errors import JetsonError

FIX = Path(__file__).parent / "fixtures" / "jetson"
AGX_TOTAL_MW = 3150 + 14310 + 4970 + 1090  # fixture: 5 V x (630, 2862, 994, 218) mA

AGX_LINE = (
    "11-23-2025 18:32:01 RAM 2281/62780MB (lfb 14791x4MB) SWAP 0/31390MB (cached 0MB) "
    "CPU [1%@729,0%@729] EMC_FREQ 0%@3199 GR3D_FREQ 0%@[612,0] VIC_FREQ 729 APE 174 CPU@44.5C "
    "VDD_GPU_SOC 3150mW/2971mW VDD_CPU_CV 14312mW/12415mW VIN_SYS_5V0 4968mW/5048mW "
    "VDDQ_VDD2_1V8AO 1091mW/1091mW"
)
NX_LINE = (
    "RAM 3000/15388MB (lfb 2x4MB) SWAP 0/7694MB (cached 0MB) CPU [2%@1190,off,off,off] "
    "GR3D_FREQ 0% cpu@45C soc2@44C VDD_IN 5000mW/4900mW VDD_CPU_GPU_CV 800mW/790mW VDD_SOC 1500mW/1490mW"
)


def test_hwmon_agx_orin():
    src = telemetry.HwmonSource(FIX / "agx-orin-jp6")
    rails = src.read_rails()
    assert set(rails) == {
        "VDD_GPU_SOC",
        "VDD_CPU_CV",
        "VIN_SYS_5V0",
        "VDDQ_VDD2_1V8AO",
    }  # "sum" skipped
    assert rails["VDD_GPU_SOC"] == pytest.approx(3150)
    assert telemetry.module_total_mw(rails) == pytest.approx(AGX_TOTAL_MW)  # no VDD_IN: sum


def test_iio_old_layout():
    rails = telemetry.IioSource(FIX / "agx-orin-iio").read_rails()
    assert rails["VDD_CPU_CV"] == pytest.approx(14310)  # in_power file
    assert rails["VDDQ_VDD2_1V8AO"] == pytest.approx(1090)  # voltage x current
    assert telemetry.module_total_mw(rails) == pytest.approx(AGX_TOTAL_MW)


def test_hwmon_orin_nx_total_is_vdd_in():
    rails = telemetry.HwmonSource(FIX / "orin-nx-jp6").read_rails()
    assert set(rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert telemetry.module_total_mw(rails) == pytest.approx(7000)


def test_hwmon_number_is_globbed(tmp_path):
    import shutil

    shutil.copytree(FIX / "orin-nx-jp6", tmp_path / "root")
    hw = tmp_path / "root/sys/bus/i2c/drivers/ina3221/1-0040/hwmon"
    (hw / "hwmon1").rename(hw / "hwmon7")  # renumbered after a reboot
    assert telemetry.HwmonSource(tmp_path / "root").read_rails()["VDD_IN"] == pytest.approx(7000)


def test_parse_tegrastats_lines():
    agx = telemetry.parse_tegrastats_line(AGX_LINE)
    assert agx == {
        "VDD_GPU_SOC": (3150, 2971),
        "VDD_CPU_CV": (14312, 12415),
        "VIN_SYS_5V0": (4968, 5048),
        "VDDQ_VDD2_1V8AO": (1091, 1091),
    }
    nx = telemetry.parse_tegrastats_line(NX_LINE)
    assert nx == {"VDD_IN": (5000, 4900), "VDD_CPU_GPU_CV": (800, 790), "VDD_SOC": (1500, 1490)}
    old = telemetry.parse_tegrastats_line(
        "RAM 1/2MB IRAM 0/252kB VDD_IN 4977/4977 VDD_SOC 1000/990"
    )
    assert old == {"VDD_IN": (4977, 4977), "VDD_SOC": (1000, 990)}


@pytest.mark.parametrize("board,total", [("agx", 3150 + 14312 + 4968 + 1091), ("nx", 7000)])
def test_tegrastats_stand_in(monkeypatch, board, total):
    monkeypatch.setenv("PATH", f"{FIX / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TEGRASTATS_BOARD", board)
    tel = telemetry.open_telemetry("tegrastats", FIX / "agx-orin-jp6", rate_hz=50)
    try:
        sample = tel.read()
    finally:
        tel.close()
    assert sample.source == "tegrastats"
    assert sample.total_mw == pytest.approx(total, abs=50)


def test_jtop_fake(monkeypatch):
    class FakeJtop:
        def __init__(self):
            self.power = {
                "rail": {
                    "VDD_GPU_SOC": {"power": 3000, "avg": 2900},
                    "VDD_CPU_CV": {"power": 9000},
                },
                "tot": {"power": 15000, "avg": 14000},
            }

        def start(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "jtop", types.SimpleNamespace(jtop=FakeJtop))
    tel = telemetry.PowerTelemetry(telemetry.JtopSource())
    s = tel.read()
    assert s.rails_mw == {"VDD_GPU_SOC": 3000, "VDD_CPU_CV": 9000}
    assert s.watts == pytest.approx(15.0)  # jtop's own total


def test_jtop_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "jtop", None)
    with pytest.raises(JetsonError, match="jetson-stats is not installed"):
        telemetry.JtopSource()


def test_auto_prefers_sysfs_then_reports_all_failures(monkeypatch, tmp_path):
    assert telemetry.open_source("auto", FIX / "agx-orin-jp6").name == "hwmon"
    assert telemetry.open_source("auto", FIX / "agx-orin-iio").name == "iio"
    bare = tmp_path / "bare-jetson"  # a Jetson with no rails exposed, no jtop, no tegrastats
    (bare / "etc").mkdir(parents=True)
    (bare / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0\n")
    monkeypatch.setitem(sys.modules, "jtop", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        JetsonError, match="no power telemetry source.*hwmon.*iio.*jtop.*tegrastats"
    ):
        telemetry.open_source("auto", bare)


def test_not_a_jetson():
    with pytest.raises(JetsonError, match="not a Jetson"):
        telemetry.open_telemetry("auto", FIX / "not-jetson")


def test_collect_at_rate_in_simulated_time():
    t = [0.0]
    tel = telemetry.PowerTelemetry(
        telemetry.HwmonSource(FIX / "agx-orin-jp6"), rate_hz=4, clock=lambda: t[0]
    )
    samples = tel.collect(2.0, sleep=lambda dt: t.__setitem__(0, t[0] + dt))
    assert len(samples) == 9  # 0, 0.25, ..., 2.0
    assert tel.average_w(1.0) == pytest.approx(AGX_TOTAL_MW / 1000)
    summary = telemetry.summarize(samples)
    assert summary["samples"] == 9 and summary["seconds"] == pytest.approx(2.0)
    assert summary["rails_w"]["VDD_CPU_CV"] == pytest.approx(14.31)


def test_background_sampling():
    tel = telemetry.PowerTelemetry(telemetry.HwmonSource(FIX / "orin-nx-jp6"), rate_hz=100)
    tel.start()
    import time

    time.sleep(0.1)
    tel.stop()
    assert len(tel.history) >= 2 and tel.average_w() == pytest.approx(7.0)
