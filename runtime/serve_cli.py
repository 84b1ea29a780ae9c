"""``moe2edge serve BUNDLE``: the text API, voice WebSocket and web page on one process."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def register(subparsers, name: str, help_text: str, parents=()) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        parents=list(parents),
        help=help_text,
        description=f"{help_text}. Any config key can also be set as key=value "
        "(see runtime/server/config.py and docs/service.md).",
    )
    p.add_argument("bundle", help="bundle directory (holds manifest.json)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (right after BUNDLE)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--config", help="YAML file of config keys")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' (default: $MOE2EDGE_TOKEN, else none)",
    )
    p.add_argument("--grammar", default=None, help="JSGF grammar file for speech recognition")
    p.add_argument("--slots", type=int, default=None, help="generations at once (default 2)")
    p.add_argument("--queue", type=int, default=None, help="waiting generations (default 8)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "tensorrt"])
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default 1)")
    p.add_argument("--end-silence-ms", type=float, default=None, help="endpoint silence (300)")
    p.add_argument(
        "--draft", default=None, metavar="BUNDLE", help="draft bundle for speculative decoding"
    )
    p.add_argument(
        "--speculate",
        default=None,
        choices=["off", "ngram", "draft"],
        help="speculative decoding: ngram (prompt lookup), draft (--draft), off "
        "(default: draft with --draft, else off)",
    )
    p.add_argument(
        "--version",
        action="append",
        default=[],
        metavar="NAME=DIR[:WEIGHT]",
        help="one more bundle to serve as version NAME with its weight in the split "
        "(repeatable; see --version-name)",
    )
    p.add_argument(
        "--version-name",
        default=None,
        metavar="NAME[:WEIGHT]",
        help="the version name (and weight) of BUNDLE (default: the model id, weight 1)",
    )
    p.add_argument("--no-voice", action="store_true", help="serve text only")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=run)
    return p


def server_config(args: argparse.Namespace):
    """The ``ServerConfig`` from ``--config``, the flags and ``key=value`` overrides."""
    from moe2edge.runtime.server import load_server_config
    from moe2edge.runtime.server.config import parse_version

    main_name, _, main_weight = (getattr(args, "version_name", None) or "").partition(":")
    return load_server_config(
        args.config,
        [*args.overrides, *args.set],
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get("MOE2EDGE_TOKEN") or None,
        grammar=args.grammar,
        slots=args.slots,
        queue=args.queue,
        device=args.device,
        threads=args.threads,
        vad_end_silence_ms=args.end_silence_ms,
        voice_enabled=False if args.no_voice else None,
        draft_bundle=args.draft,
        speculative_decoding=args.speculate or ("draft" if args.draft else None),
        version_name=main_name or None,
        version_weight=main_weight or None,
        versions=[parse_version(v) for v in getattr(args, "version", [])] or None,
    )


def speculation_config(config):
    """The server config's speculative decoding settings as a ``SpeculationConfig``."""
    from moe2edge.runtime.server.config import speculation_config as from_config

    return from_config(config)


def run(args: argparse.Namespace, step_hook=None, concurrency_limiter=None) -> int:
    """Serve until stopped. ``step_hook`` / ``concurrency_limiter``: see ``create_app``
    (``moe2edge jetson serve`` passes its power governor here)."""
    import uvicorn

    from moe2edge.runtime.server import create_app
    from moe2edge.runtime.server.versions import load_generator

    config = server_config(args)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.token:
        log.warning("binding %s without a token: anyone on the network can use it", config.host)
    generator = load_generator(config, args.bundle)
    app = create_app(
        config, generator=generator, step_hook=step_hook, concurrency_limiter=concurrency_limiter
    )
    log.info(
        "serving %s on http://%s:%d (voice %s, %d slots, queue %d, speculative decoding %s)",
        args.bundle,
        config.host,
        config.port,
        "on" if config.voice_enabled else "off",
        config.slots,
        config.queue,
        config.speculative_decoding,
    )
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=args.log_level,
        ws_max_size=max(4 * config.max_ws_message_bytes, 1 << 20),
        timeout_graceful_shutdown=5,
    )
    return 0
