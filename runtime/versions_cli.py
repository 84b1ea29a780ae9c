"""``moe2edge versions list|load|weights|retire|rollback``: the admin API of a running
service's versions (``runtime/server/versions_api.py``), over HTTP with the standard
library only (the device install has no httpx)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from moe2edge.runtime.errors import RuntimeUserError


def register(subparsers, name: str, help_text: str, parents=()) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, parents=list(parents), help=help_text, description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://127.0.0.1:8000", help="the service")
    common.add_argument(
        "--token", default=None, help="its bearer token (default: $MOE2EDGE_TOKEN, else none)"
    )
    common.add_argument("--timeout", type=float, default=600, help="seconds per call")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", parents=[common], help="the versions, their state and the split")
    load = sub.add_parser("load", parents=[common], help="hot load a bundle as a new version")
    load.add_argument("name")
    load.add_argument("bundle", help="bundle directory on the server's machine")
    load.add_argument("--weight", type=float, default=0.0, help="its share once loaded (0)")
    load.add_argument("--no-wait", action="store_true", help="return before it serves")
    weights = sub.add_parser("weights", parents=[common], help="set weights: NAME=WEIGHT ...")
    weights.add_argument("weights", nargs="+", metavar="NAME=WEIGHT")
    retire = sub.add_parser("retire", parents=[common], help="retire a version (drains it)")
    retire.add_argument("name")
    retire.add_argument("--wait", action="store_true", help="return once it is freed")
    sub.add_parser("rollback", parents=[common], help="undo the last load / weights / retire")
    p.set_defaults(handler=run)
    return p


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One admin call; its JSON answer, or a ``RuntimeUserError`` with the server's message."""
    token = args.token or os.environ.get("MOE2EDGE_TOKEN")
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        args.url.rstrip("/") + path, data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise RuntimeUserError(f"{method} {path}: HTTP {exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise RuntimeUserError(f"cannot reach {args.url}: {exc.reason}") from None


def parse_weights(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, raw = item.partition("=")
        try:
            out[name] = float(raw)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise RuntimeUserError(f"bad weight {item!r}: use NAME=WEIGHT, e.g. b=10")
    return out


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        answer = call(args, "GET", "/admin/versions")
    elif args.action == "load":
        body = {"name": args.name, "bundle": args.bundle, "weight": args.weight}
        answer = call(args, "POST", "/admin/versions", {**body, "wait": not args.no_wait})
    elif args.action == "weights":
        answer = call(args, "PATCH", "/admin/versions", {"weights": parse_weights(args.weights)})
    elif args.action == "retire":
        name = urllib.parse.quote(args.name, safe="")
        answer = call(args, "DELETE", f"/admin/versions/{name}?wait={str(args.wait).lower()}")
    else:
        answer = call(args, "POST", "/admin/versions/rollback")
    json.dump(answer, sys.stdout, indent=2)
    print()
    return 0
