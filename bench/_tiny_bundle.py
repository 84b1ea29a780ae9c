"""The tiny demo bundle the service benchmarks serve (seconds to build; the service is measured,
not the model): demo data -> tokenizer -> tiny MoE teacher -> tiny student -> FP32 bundle,
the recipe of the tests' ``tiny_run`` fixture."""

from __future__ import annotations

from pathlib import Path


def build_tiny_bundle(root: str | Path) -> dict[str, Path]:
    """Build (or reuse) the tiny bundle under ``root``: {"bundle", "grammar", "eval"}."""
    root = Path(root)
    bundle = root / "bundle"
    paths = {"bundle": bundle, "grammar": root / "data" / "grammar.jsgf", "eval": root / "data"}
    if (bundle / "manifest.json").is_file():
        return _found(root, paths)
    from moe2edge.tiny import build_tiny_run  # the recipe of the tests' tiny_run fixture

    run = build_tiny_run(root)
    return _found(root, paths | {"grammar": run["grammar"], "eval": run["eval"]})


def _found(root: Path, paths: dict[str, Path]) -> dict[str, Path]:
    if not paths["grammar"].is_file():
        grammars = sorted((root / "data").glob("*.jsgf"))
        paths["grammar"] = grammars[0] if grammars else None
    return paths
