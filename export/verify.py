"""Checking that a bundle's ONNX graph still has the io contract its manifest promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.bundle import describe_io
from runtime.errors import BundleError


def verify_io_contract(bundle_dir: str | Path, manifest: dict[str, Any]) -> None:
    io = manifest["io"]
    actual = describe_io(Path(bundle_dir) / io["model_file"])
    for side in ("inputs", "outputs"):
        want = {e["name"]: e for e in io[side]}
        have = {e["name"]: e for e in actual[side]}
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        changed = sorted(n for n in set(want) & set(have) if want[n]["dtype"] != have[n]["dtype"])
        if missing or extra or changed:
            raise BundleError(
                f"{bundle_dir}: the graph's {side} differ from the manifest "
                f"(missing {missing}, unexpected {extra}, dtype changed {changed}); re-export"
            )
