"""Power modes against fixture trees (AGX Orin JetPack 6 and old iio layout, Orin NX) and a
stand-in `nvpmodel` that prints what the real one prints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe2edge.jetson import board, power_modes
from moe2edge.jetson.errors import JetsonError

FIX = Path(__file__).parent / "fixtures" / "jetson"
BOARDS = ["agx-orin-jp6", "agx-orin-iio", "orin-nx-jp6"]


@pytest.fixture
def device(monkeypatch, tmp_path):
    """Point the stand-in executables at a fixture board; returns its root."""

    def use(name: str) -> Path:
        root = FIX / name
        monkeypatch.setenv("PATH", f"{FIX / 'bin'}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_NVPMODEL_CONF", str(root / "etc/nvpmodel.conf"))
        monkeypatch.setenv("FAKE_NVPMODEL_STATE", str(tmp_path / "nvpmodel-state"))
        return root

    return use


def test_parse_agx_conf():
    conf = power_modes.load_nvpmodel_conf(FIX / "agx-orin-jp6/etc/nvpmodel.conf")
    assert [m.name for m in conf.modes] == ["MAXN", "MODE_15W", "MODE_30W", "MODE_50W"]
    assert conf.default_id == 2
    m30 = conf.by_id(2)
    assert m30.watts == 30 and m30.cpu_online == 8
    assert m30.cpu_max_khz == 1728000 and m30.gpu_max_hz == 612_000_000
    assert m30.emc_max_hz is None  # EMC not capped at 30 W (field notes)
    assert m30.gpu_tpcs(8) == 4
    m15 = conf.by_id(1)
    assert m15.emc_max_hz == 2_133_000_000 and m15.gpu_max_hz == 408_000_000 and m15.cpu_online == 4
    maxn = conf.by_id(0)
    assert maxn.watts is None and maxn.gpu_max_hz is None and maxn.cpu_max_khz is None
    assert "GPU" in conf.params and "MAX_FREQ" in conf.params["GPU"]


def test_parse_nx_conf():
    conf = power_modes.load_nvpmodel_conf(FIX / "orin-nx-jp6/etc/nvpmodel.conf")
    assert [m.watts for m in conf.modes] == [None, 10, 15, 25]
    assert conf.by_id(1).gpu_tpcs(4) == 2


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("2", 2),
        (2, 2),
        ("30W", 2),
        ("30", 2),
        ("mode_30w", 2),
        ("MODE_15W", 1),
        ("maxn", 0),
        ("50w", 3),
    ],
)
def test_find_mode(spec, expected):
    conf = power_modes.load_nvpmodel_conf(FIX / "agx-orin-jp6/etc/nvpmodel.conf")
    assert power_modes.find_mode(conf, spec).id == expected


def test_find_mode_unknown_lists_modes():
    conf = power_modes.load_nvpmodel_conf(FIX / "agx-orin-jp6/etc/nvpmodel.conf")
    with pytest.raises(JetsonError, match="0=MAXN"):
        power_modes.find_mode(conf, "40W")


def test_conf_errors(tmp_path):
    with pytest.raises(JetsonError, match="does not exist"):
        power_modes.load_nvpmodel_conf(tmp_path / "nope.conf")
    bad = tmp_path / "bad.conf"
    bad.write_text("hello\n")
    with pytest.raises(JetsonError, match="POWER_MODEL"):
        power_modes.load_nvpmodel_conf(bad)


def test_parse_query_output():
    assert power_modes.parse_nvpmodel_query("NV Power Mode: MODE_30W\n2\n") == (2, "MODE_30W")
    assert power_modes.parse_nvpmodel_query("NVPM WARN: x\nNV Power Mode: MAXN\n0\n") == (0, "MAXN")


@pytest.mark.parametrize("name", BOARDS)
def test_query_and_set(device, name):
    root = device(name)
    assert power_modes.query_mode(root=root) == (2, "MODE_30W" if "agx" in name else "MODE_15W")
    msg = power_modes.set_mode(
        "MODE_10W" if "nx" in name else "15W", root / "etc/nvpmodel.conf", root=root, euid=0
    )
    assert "now 1" in msg
    assert power_modes.query_mode(root=root)[0] == 1


def test_set_refuses_non_root(device):
    root = device("agx-orin-jp6")
    with pytest.raises(JetsonError, match="needs root.*sudo"):
        power_modes.set_mode("30W", root / "etc/nvpmodel.conf", root=root, euid=1000)


def test_set_reports_reboot(device, monkeypatch):
    root = device("agx-orin-jp6")
    monkeypatch.setenv("FAKE_NVPMODEL_REBOOT", "1")
    msg = power_modes.set_mode("MAXN", root / "etc/nvpmodel.conf", root=root, euid=0)
    assert "needs a reboot" in msg
    assert power_modes.query_mode(root=root)[0] == 2  # unchanged: we never reboot


def test_missing_nvpmodel(device):
    root = device("agx-orin-jp6")
    with pytest.raises(JetsonError, match="not found on PATH"):
        power_modes.query_mode("no-such-nvpmodel", root=root)


def test_refuses_off_jetson(device):
    root = device("not-jetson")
    with pytest.raises(JetsonError, match="not a Jetson"):
        power_modes.query_mode(root=root)
    with pytest.raises(JetsonError, match="not a Jetson"):
        power_modes.set_mode("30W", FIX / "agx-orin-jp6/etc/nvpmodel.conf", root=root, euid=0)


def test_clocks():
    c = power_modes.read_clocks(FIX / "agx-orin-jp6")
    assert c["cpu_online"] == list(range(8))
    assert c["gpu_cur_mhz"] == 612 and c["emc_cur_mhz"] == 3199
    c = power_modes.read_clocks(FIX / "agx-orin-iio")  # JetPack 5 names the GPU 17000000.ga10b
    assert c["gpu_max_mhz"] == 612 and c["emc_cur_mhz"] is None
    assert power_modes.parse_cpu_list("0-3,6") == [0, 1, 2, 3, 6]


@pytest.mark.parametrize(
    "name,module,l4t,jetpack",
    [
        ("agx-orin-jp6", "agx-orin-64gb", "36.3.0", "6.0"),
        ("agx-orin-iio", "agx-orin-32gb", "35.1.0", "5.0.2"),
        ("orin-nx-jp6", "orin-nx-16gb", "36.4.0", "6.1/6.2"),
    ],
)
def test_board(name, module, l4t, jetpack):
    info = board.read_board(FIX / name)
    assert (info.module, info.l4t, info.jetpack) == (module, l4t, jetpack)
    assert "nvidia,tegra234" in info.compatible


def test_not_a_jetson_message():
    assert not board.is_jetson(FIX / "not-jetson")
    with pytest.raises(JetsonError, match="not a Jetson.*plan. runs anywhere"):
        board.read_board(FIX / "not-jetson")
