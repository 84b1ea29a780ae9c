"""The ``moe2edge`` console script: one subcommand group per stage.

Each stage module is imported only when its subcommand runs, so the device install
(``runtime`` only, no torch) can run ``moe2edge generate`` and ``moe2edge serve``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module with `register(subparsers)`, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "distill": ("moe2edge.distill.cli", "distil an MoE teacher into a dense student"),
    "export": ("moe2edge.export.cli", "quantize and export a student as an ONNX bundle"),
    "generate": ("moe2edge.runtime.cli", "generate text from a bundle (streams to stdout)"),
    "serve": ("moe2edge.runtime.serve_cli", "run the on-device text and voice service"),
    "versions": ("moe2edge.runtime.versions_cli", "load, weigh, retire, roll back served versions"),
    "jetson": ("moe2edge.jetson.cli", "Jetson power modes, telemetry, planner, deployment"),
    "profile": ("moe2edge.jetson.profile_cli", "per-layer/operator time and memory of a bundle"),
    "bench": ("moe2edge.jetson.bench_suite", "the standard benchmark: TTFT, decode, concurrency"),
    "demo": ("moe2edge.demo", "run the whole pipeline on the built-in tiny models"),
}

# Exceptions that mean "the user gave us something wrong": printed without a traceback.
USER_ERROR_CLASSES = {
    "moe2edge.distill.errors": "DistillError",
    "moe2edge.export.errors": "ExportError",
    "moe2edge.runtime.errors": "RuntimeUserError",
    "moe2edge.jetson.errors": "JetsonError",
    "moe2edge.fileio": "DiskFullError",  # an artifact writer ran out of space
}


def _user_error_types() -> tuple[type[BaseException], ...]:
    found = []
    for module_name, class_name in USER_ERROR_CLASSES.items():
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, class_name):
            found.append(getattr(module, class_name))
    return tuple(found)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe2edge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Import only the stage that was asked for (plus all of them for --help).
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in STAGES.items():
        if wanted in STAGES and name != wanted:
            sub.add_parser(name, help=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # stage's extra not installed on this machine
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {exc.name} missing)")
            p.set_defaults(handler=_missing_extra(name, exc))
            continue
        module.register(sub, name, help_text)
    return parser


def _missing_extra(stage: str, exc: ImportError):
    def handler(_args: argparse.Namespace) -> int:
        extra = {
            "generate": "runtime",
            "serve": "runtime",
            "versions": "runtime",
            "profile": "runtime",
            "bench": "runtime",
            "demo": "all",
        }.get(stage, stage)
        print(
            f"moe2edge: error: '{stage}' needs the Python package '{exc.name}', which is not "
            f"installed. Install it with: pip install 'moe2edge[{extra}]'",
            file=sys.stderr,
        )
        return 2

    return handler


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("moe2edge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_error_types()):
            print(f"moe2edge: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
