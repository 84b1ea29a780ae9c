"""TensorRT optimization profiles from a bundle manifest's ``io`` inputs.

Symbolic dims (``batch_size``, ``sequence_length``, ``past_sequence_length``,
``total_sequence_length``...) are mapped to ranges (``profile_ranges``): one profile for
prefill (many new tokens) and one for decode (one new token, long past), both with a batch
dimension. The manifest fields read here
(export owns the format; others are ignored)::

    "io": {"model_file": "model.onnx", "max_sequence_length": 4096,
           "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
                      {"name": "past_key_values.0.key", "shape": ["batch_size", 8, "past_sequence_length", 128]}, ...]}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from moe2edge.runtime.errors import BundleError

log = logging.getLogger(__name__)


@dataclass
class Profile:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=dict
    )
    ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # per dimension kind


def _dim_kind(dim: str) -> str:
    d = dim.lower().replace(" ", "")
    if "batch" in d:
        return "batch"
    if (
        "total" in d
        or ("past" in d and "+" in d)
        or d in ("attention_mask_length", "all_sequence_length")
    ):
        return "total"
    if "past" in d or "cache" in d:
        return "past"
    if "seq" in d or "token" in d or d in ("length", "len"):
        return "new"
    raise BundleError(
        f"input dimension {dim!r} is neither batch, sequence, past nor total length: cannot derive "
        "TensorRT profiles; name it batch_size / sequence_length / past_sequence_length / "
        "total_sequence_length in the manifest's io.inputs"
    )


def manifest_inputs(manifest: dict[str, Any]) -> dict[str, list[Any]]:
    """name -> shape (ints and symbolic names) from ``io.inputs`` (a list or a mapping)."""
    io = manifest.get("io", {})
    raw = io.get("inputs")
    if raw is None:
        raise BundleError("the manifest's io has no 'inputs': cannot derive TensorRT profiles")
    out: dict[str, list[Any]] = {}
    items = raw.items() if isinstance(raw, dict) else ((r.get("name"), r) for r in raw)
    for name, spec in items:
        shape = spec.get("shape") if isinstance(spec, dict) else spec
        if name is None or shape is None:
            raise BundleError(f"io.inputs entry {spec!r} needs a name and a shape")
        out[str(name)] = list(shape)
    return out


def max_context(manifest: dict[str, Any]) -> int:
    """The bundle's context length (``io.max_sequence_length``, else model/generation fields)."""
    io, gen, model = (
        manifest.get("io", {}),
        manifest.get("generation", {}),
        manifest.get("model", {}),
    )
    for src, key in (
        (io, "max_sequence_length"),
        (gen, "max_length"),
        (model, "max_position_embeddings"),
        (model, "context_length"),
    ):
        if isinstance(src, dict) and src.get(key):
            return int(src[key])
    return 4096


Ranges = dict[str, tuple[int, int, int]]  # kind (batch, new, past, total) -> (min, opt, max)


def profile_ranges(
    ctx: int, max_batch: int = 1, max_prefill: int | None = None, opt_prefill: int | None = None
) -> dict[str, Ranges]:
    """The (min, opt, max) of every dimension kind in the prefill and decode profiles.

    TensorRT builds and checks the network at each corner (all mins, all opts, all maxes),
    so at every corner ``past + new == total`` must hold, or the attention mask and the
    concatenated KV disagree. Each profile covers a box of (past, new), so:

    * prefill: 1..P new tokens over a past of 0..ctx-P (P = max_prefill, default
      min(512, ctx // 2)): a long prompt or a later chat turn, in chunks of up to P;
    * decode: one new token over a past of 1..ctx-1, up to ``max_batch`` rows at once.

    A chunk of more than one token over a past above ctx-P is not covered by either: the
    runner feeds those last positions one at a time through the decode profile.
    """
    if ctx < 2 or max_batch < 1:
        raise BundleError(f"need max_seq_len >= 2 and max_batch >= 1 (got {ctx}, {max_batch})")
    prefill = min(max_prefill or min(512, ctx // 2), ctx)
    if prefill < 1:
        raise BundleError(f"max_prefill must be >= 1 (got {max_prefill})")
    opt_p = max(1, min(opt_prefill or min(128, prefill), prefill))
    ranges = {
        "prefill": {
            "batch": (1, 1, max_batch),
            "new": (1, opt_p, prefill),
            "past": (0, 0, ctx - prefill),
            "total": (1, opt_p, ctx),
        },
        "decode": {
            "batch": (1, max_batch, max_batch),
            "new": (1, 1, 1),
            "past": (1, ctx // 2, ctx - 1),
            "total": (2, ctx // 2 + 1, ctx),
        },
    }
    for name, kinds in ranges.items():
        check_corners(name, kinds)
    return ranges


def check_corners(name: str, kinds: Ranges) -> None:
    """min <= opt <= max for every kind, batch >= 1, and past + new == total at every corner."""
    problems = []
    for kind, (lo, opt, hi) in kinds.items():
        if not lo <= opt <= hi:
            problems.append(f"{kind} range ({lo}, {opt}, {hi}) is not ordered")
    if kinds["batch"][0] < 1:
        problems.append(f"batch starts at {kinds['batch'][0]}")
    for i, corner in enumerate(("min", "opt", "max")):
        past, new, total = kinds["past"][i], kinds["new"][i], kinds["total"][i]
        if past + new != total:
            problems.append(f"{corner} corner: past {past} + new {new} != total {total}")
    if problems:
        raise BundleError(f"profile {name}: " + "; ".join(problems))


def profiles_from_manifest(
    manifest: dict[str, Any],
    max_batch: int = 1,
    max_seq_len: int | None = None,
    max_prefill: int | None = None,
    opt_prefill: int | None = None,
) -> list[Profile]:
    """A prefill and a decode optimization profile covering every dynamic input
    (ranges from ``profile_ranges``)."""
    ctx = max_seq_len or max_context(manifest)
    ranges = profile_ranges(ctx, max_batch, max_prefill, opt_prefill)
    profiles = []
    for pname, kinds in ranges.items():
        prof = Profile(pname, ranges=dict(kinds))
        for name, shape in manifest_inputs(manifest).items():
            if any(isinstance(d, int) and d <= 0 for d in shape) or any(d is None for d in shape):
                raise BundleError(
                    f"input {name} has an unnamed dynamic dimension {shape}: name it in the ONNX "
                    "export (batch_size, sequence_length, past_sequence_length, ...)"
                )
            if all(isinstance(d, int) for d in shape):
                continue  # static input: no profile entry needed
            dims = [
                [d, d, d] if isinstance(d, int) else list(kinds[_dim_kind(str(d))]) for d in shape
            ]
            prof.shapes[name] = tuple(tuple(int(dim[i]) for dim in dims) for i in range(3))  # type: ignore[assignment]
        profiles.append(prof)
    return profiles


def check_profiles_cover_inputs(
    profiles: list[Profile], network_inputs: dict[str, tuple[int, ...]]
) -> None:
    """Every dynamic network input (a -1 dim) needs a shape in every profile, of its rank."""
    problems = []
    for prof in profiles:
        for name, shape in network_inputs.items():
            if any(d < 0 for d in shape) and name not in prof.shapes:
                problems.append(f"{prof.name}: no shape for dynamic input {name}{list(shape)}")
            elif name in prof.shapes and len(prof.shapes[name][0]) != len(shape):
                problems.append(
                    f"{prof.name}: {name} has rank {len(shape)}, profile gives {len(prof.shapes[name][0])}"
                )
        for name in prof.shapes:
            if name not in network_inputs:
                log.warning(
                    "profile %s names %s, which the ONNX model does not have", prof.name, name
                )
    if problems:
        raise BundleError(
            "the manifest's io.inputs do not match the ONNX model: " + "; ".join(problems)
        )
