"""``moe2edge jetson ...``: power modes, telemetry, planner, doctor, engine build, service.

Only ``plan`` and ``governor-sim`` run anywhere; the rest need the Jetson and say so.
Every device path is configurable (``--root`` for sysfs/proc/etc, ``--nvpmodel-conf``,
``--nvpmodel``, ``--tegrastats``) so the commands can run against a fixture tree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from moe2edge.jetson import (
    deploy,
    doctor,
    planner,
    power_modes,
    published,
    telemetry,
    throughput,
)
from moe2edge.jetson.board import is_jetson, read_board, require_jetson
from moe2edge.jetson.errors import JetsonError
from moe2edge.jetson.serve import register_serve


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("device paths")
    g.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("MOE2EDGE_JETSON_ROOT", "/")),
        help="filesystem root holding /sys, /proc and /etc (default: / or $MOE2EDGE_JETSON_ROOT)",
    )
    g.add_argument(
        "--nvpmodel-conf",
        type=Path,
        default=None,
        help="power mode definitions (default: ROOT/etc/nvpmodel.conf)",
    )
    g.add_argument("--nvpmodel", default="nvpmodel", help="nvpmodel executable")
    g.add_argument("--tegrastats", default="tegrastats", help="tegrastats executable")
    return p


def _conf_path(args: argparse.Namespace) -> Path:
    return args.nvpmodel_conf or Path(args.root) / "etc/nvpmodel.conf"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --- handlers -------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    if args.compare_published:
        rows = published.compare_published()
        if args.json:
            _print_json(rows)
        else:
            print(published.format_comparison(rows))
        return 0
    conf_mode = None
    if args.nvpmodel_conf is not None:
        conf_mode = power_modes.find_mode(
            power_modes.load_nvpmodel_conf(args.nvpmodel_conf), args.mode
        )
    inputs = planner.make_inputs(
        args.model,
        args.module,
        args.mode,
        conf_mode=conf_mode,
        precision=args.precision,
        group_size=args.group_size,
        lm_head_precision=args.lm_head_precision,
        runtime=args.runtime,
        context=args.context,
        batch=args.batch,
        prompt_tokens=args.prompt_tokens,
        voice_tokens=args.voice_tokens,
    )
    result = planner.plan(inputs)
    teacher = args.teacher or ("deepseek-v3" if args.model == "dense-13b" else None)
    streams = tuple(int(s) for s in args.streams.split(","))
    serving = throughput.serving_plan(result, args.draft, args.acceptance, teacher, streams)
    if args.json:
        _print_json({**result, "serving": serving})
    else:
        print(planner.format_plan(result))
        print(throughput.format_serving(serving))
    return 0 if result["fits"] else 1


def cmd_modes(args: argparse.Namespace) -> int:
    if args.nvpmodel_conf is None:
        require_jetson(args.root)
    conf = power_modes.load_nvpmodel_conf(_conf_path(args))
    total_tpcs = args.total_tpcs
    if total_tpcs is None and is_jetson(args.root):
        module = read_board(args.root).module
        total_tpcs = planner.MODULES[module].total_tpcs if module in planner.MODULES else None
    rows = [m.summary(total_tpcs) for m in conf.modes]
    if args.json:
        _print_json({"conf": str(conf.path), "default_id": conf.default_id, "modes": rows})
        return 0
    print(f"{conf.path} (default mode {conf.default_id})")
    for r in rows:
        default = " (default)" if r["id"] == conf.default_id else ""
        print(
            f"  {r['id']}: {r['name']:<10} {r['cpu_online']:>2} CPUs up to {r['cpu_max_mhz'] or 'max'} MHz, "
            f"GPU up to {r['gpu_max_mhz'] or 'max'} MHz"
            f"{', ' + str(r['gpu_tpcs']) + ' TPCs' if 'gpu_tpcs' in r else ''}, "
            f"EMC cap {r['emc_max_mhz'] or 'none'}{default}"
        )
    return 0


def cmd_mode(args: argparse.Namespace) -> int:
    if args.set:
        print(power_modes.set_mode(args.set, _conf_path(args), args.nvpmodel, args.root))
        return 0
    mode_id, name = power_modes.query_mode(args.nvpmodel, args.root)
    clocks = power_modes.read_clocks(args.root)
    if args.json:
        _print_json({"id": mode_id, "name": name, "clocks": clocks})
        return 0
    print(f"power mode {mode_id} ({name})")
    cur = [v for v in clocks["cpu_cur_mhz"].values() if v]
    print(
        f"  CPUs online: {len(clocks['cpu_online'])}"
        + (f", now up to {max(cur):.0f} MHz" if cur else "")
    )
    print(f"  GPU: {clocks['gpu_cur_mhz'] or '?'} MHz now, max {clocks['gpu_max_mhz'] or '?'} MHz")
    if clocks["emc_cur_mhz"] or clocks["emc_cap_mhz"]:
        print(
            f"  EMC: {clocks['emc_cur_mhz'] or '?'} MHz now, cap {clocks['emc_cap_mhz'] or 'none'}"
        )
    return 0


def cmd_power(args: argparse.Namespace) -> int:
    tel = telemetry.open_telemetry(args.source, args.root, args.rate, tegrastats=args.tegrastats)
    try:
        samples = tel.collect(args.seconds)
    finally:
        tel.close()
    summary = telemetry.summarize(samples)
    if args.json:
        summary["last_rails_mw"] = samples[-1].rails_mw
        _print_json(summary)
        return 0
    t = summary["total_w"]
    print(
        f"module power from {summary['source']}: {summary['samples']} samples over {summary['seconds']:.1f} s"
    )
    print(f"  total: mean {t['mean']:.2f} W, min {t['min']:.2f} W, max {t['max']:.2f} W")
    for name, w in summary["rails_w"].items():
        print(f"  {name:<18} {w:6.2f} W")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    rows = doctor.run_doctor(args.root, _conf_path(args), args.nvpmodel, args.tegrastats)
    if args.json:
        _print_json(doctor.to_json(rows))
    else:
        print(doctor.format_checks(rows))
    return 1 if any(r.status == "fail" for r in rows) else 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    path = deploy.build_engine_on_device(
        args.bundle,
        args.out,
        root=args.root,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        workspace_gb=args.workspace_gb,
        timing_cache=args.timing_cache,
        require_device=not args.any_device,
    )
    print(f"engine manifest: {path}")
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    path, text = deploy.install_service(
        args.bundle,
        args.mode,
        args.budget_w,
        root=args.root,
        conf_path=_conf_path(args),
        nvpmodel=args.nvpmodel,
        unit_dir=args.unit_dir,
        systemctl=args.systemctl,
        user=args.user,
        serve_args=args.serve_args,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        print(f"# would write {path}\n{text}")
    else:
        print(f"installed {path}; follow it with: journalctl -u {deploy.UNIT_NAME} -f")
    return 0


def cmd_governor_sim(args: argparse.Namespace) -> int:
    import logging

    from moe2edge.jetson import governor_sim

    logging.getLogger("moe2edge.jetson.governor").setLevel(
        logging.WARNING
    )  # one line per limit change
    results = governor_sim.run_all(args.duration, args.budget_w)
    if args.json:
        _print_json([r.to_dict() for r in results])
    else:
        print(governor_sim.format_table(results))
    return 0


# --- parser ---------------------------------------------------------------------------------


def register(subparsers: Any, name: str, help_text: str) -> None:
    common = _common()
    parser = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="jetson_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser(
        "plan", parents=[common], help="memory fit, decode speed, TTFT, energy, voice latency"
    )
    p.add_argument(
        "--model",
        default="dense-13b",
        help=f"preset ({', '.join(planner.PRESETS)}) or HF config.json",
    )
    p.add_argument("--precision", default="int4", choices=["fp16", "bf16", "int8", "int4"])
    p.add_argument(
        "--group-size", type=int, default=128, help="INT4 block size (one FP16 scale per block)"
    )
    p.add_argument(
        "--lm-head-precision",
        default=None,
        choices=["fp16", "int8", "int4"],
        help="default: fp16 for quantized weights, as TensorRT/ModelOpt INT4 recipes keep it",
    )
    p.add_argument("--module", default="agx-orin-64gb", help=", ".join(planner.MODULES))
    p.add_argument(
        "--mode",
        default="30W",
        help="power mode: MAXN, 50W, 30W, 15W, ... (or an id with --nvpmodel-conf)",
    )
    p.add_argument("--runtime", default="tensorrt", choices=list(planner.RUNTIMES))
    p.add_argument("--context", type=int, default=4096, help="context length for the KV cache")
    p.add_argument("--batch", type=int, default=1, help="concurrent generations (KV cache)")
    p.add_argument(
        "--prompt-tokens", type=int, default=64, help="prompt length for time to first token"
    )
    p.add_argument(
        "--voice-tokens", type=int, default=16, help="tokens prefilled after the end of speech"
    )
    p.add_argument("--streams", default="1,2,4,8", help="batch sizes for the batching table")
    p.add_argument(
        "--draft", default="dense-draft-0.6b", help="draft model for speculative decoding"
    )
    p.add_argument(
        "--acceptance",
        type=float,
        default=None,
        help="draft acceptance rate per token (0-1) for the speculative estimate (none: skip)",
    )
    p.add_argument(
        "--teacher", default=None, help="a (MoE) teacher to plan on the same module (default "
        "for dense-13b: deepseek-v3)",
    )  # fmt: skip
    p.add_argument(
        "--compare-published", action="store_true", help="planned vs published AGX Orin figures"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_plan)

    register_serve(sub, common)

    p = sub.add_parser("modes", parents=[common], help="list the power modes in nvpmodel.conf")
    p.add_argument(
        "--total-tpcs",
        type=int,
        default=None,
        help="GPU TPCs of the module (default: from the board)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_modes)

    p = sub.add_parser(
        "mode", parents=[common], help="show the power mode and clocks, or --set one (root)"
    )
    p.add_argument("--set", metavar="MODE", help="mode id, name or wattage, e.g. 30W")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_mode)

    p = sub.add_parser("power", parents=[common], help="sample module power for a few seconds")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=10.0, help="samples per second")
    p.add_argument("--source", default="auto", choices=["auto", *telemetry.SOURCES])
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_power)

    p = sub.add_parser(
        "doctor", parents=[common], help="check JetPack, TensorRT, onnxruntime, power, memory"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_doctor)

    p = sub.add_parser(
        "build-engine", parents=[common], help="build the TensorRT engine on this device"
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: BUNDLE/engine")
    p.add_argument("--max-batch", type=int, default=None, help="default per module (AGX 64GB: 4)")
    p.add_argument(
        "--max-seq-len", type=int, default=None, help="default: the manifest's max length"
    )
    p.add_argument(
        "--workspace-gb", type=float, default=None, help="builder workspace (default per module)"
    )
    p.add_argument("--timing-cache", type=Path, default=None, help="default: ~/.cache/moe2edge/")
    p.add_argument(
        "--any-device", action="store_true", help="build on a GPU machine that is not a Jetson"
    )
    p.set_defaults(handler=cmd_build_engine)

    p = sub.add_parser(
        "install-service", parents=[common], help="install and start the systemd service (root)"
    )
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--mode", default="30W")
    p.add_argument("--budget-w", type=float, default=30.0)
    p.add_argument("--user", default="root")
    p.add_argument(
        "--serve-args",
        default=None,
        help="arguments for `moe2edge serve` (default: the bundle path)",
    )
    p.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    p.add_argument("--systemctl", default="systemctl")
    p.add_argument("--dry-run", action="store_true", help="print the unit, change nothing")
    p.set_defaults(handler=cmd_install_service)

    p = sub.add_parser("governor-sim", help="run the power governor against the simulated plant")
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--budget-w", type=float, default=30.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_governor_sim)


def main(argv: list[str] | None = None) -> int:
    """Run ``jetson`` subcommands directly (``python -m moe2edge.jetson.cli plan ...``)."""
    parser = argparse.ArgumentParser(prog="moe2edge")
    register(parser.add_subparsers(dest="command", required=True), "jetson", "Jetson tools")
    args = parser.parse_args(["jetson", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.handler(args) or 0)
    except JetsonError as exc:
        print(f"moe2edge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
