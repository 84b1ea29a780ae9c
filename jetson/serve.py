"""``moe2edge jetson serve``: the runtime service held inside a power budget.

The runtime cannot import jetson (it is the leaf), so the composition happens here:
open the module's power telemetry, start a ``PowerGovernor`` on it, and hand the
governor to the runtime service as its decode-step hook (pacing) and concurrency
limiter (admission). Everything else is ``moe2edge serve``'s, argument for argument.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from moe2edge.jetson import telemetry
from moe2edge.jetson.governor import PowerGovernor

log = logging.getLogger(__name__)


def register_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    from moe2edge.runtime import serve_cli

    p = serve_cli.register(
        sub, "serve", "run the text and voice service inside a power budget", parents=[common]
    )
    p.add_argument(
        "--budget-w",
        type=float,
        default=float(os.environ.get("MOE2EDGE_POWER_BUDGET_W", 30.0)),
        help="rolling-average module power budget in W (default 30 or $MOE2EDGE_POWER_BUDGET_W)",
    )
    p.add_argument("--window-s", type=float, default=5.0, help="averaging window (default 5 s)")
    p.add_argument("--source", default="auto", help="telemetry: auto|hwmon|iio|tegrastats|jtop")
    p.add_argument("--rate", type=float, default=10.0, help="telemetry samples per second")
    p.add_argument("--max-concurrency", type=int, default=4)
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from moe2edge.runtime import serve_cli

    tel = telemetry.open_telemetry(
        args.source, args.root, args.rate, args.window_s, tegrastats=args.tegrastats
    )
    tel.start()
    governor = PowerGovernor(
        tel, budget_w=args.budget_w, window_s=args.window_s, max_concurrency=args.max_concurrency
    )
    log.info(
        "power governor: budget %.1f W over %.1f s from %s",
        args.budget_w,
        args.window_s,
        tel.source.name,
    )
    try:
        return serve_cli.run(
            args, step_hook=governor.before_decode_step, concurrency_limiter=governor
        )
    finally:
        tel.close()
