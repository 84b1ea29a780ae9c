"""Jetson AGX Orin support: power modes, power telemetry, a power governor, a capacity
planner, a doctor, engine builds and the service deployment.

No Jetson-only imports at module level: everything here imports on any machine, and the
functions that need the device raise ``JetsonError`` with a clear message elsewhere.
"""

from moe2edge.jetson.board import is_jetson, read_board, require_jetson
from moe2edge.jetson.errors import JetsonError
from moe2edge.jetson.governor import PowerGovernor
from moe2edge.jetson.planner import PlanInputs, make_inputs, plan
from moe2edge.jetson.power_modes import (
    find_mode,
    load_nvpmodel_conf,
    query_mode,
    read_clocks,
    set_mode,
)
from moe2edge.jetson.telemetry import (
    PowerSample,
    PowerTelemetry,
    open_telemetry,
    parse_tegrastats_line,
)

__all__ = [
    "JetsonError",
    "PlanInputs",
    "PowerGovernor",
    "PowerSample",
    "PowerTelemetry",
    "find_mode",
    "is_jetson",
    "load_nvpmodel_conf",
    "make_inputs",
    "open_telemetry",
    "parse_tegrastats_line",
    "plan",
    "query_mode",
    "read_board",
    "read_clocks",
    "require_jetson",
    "set_mode",
]
