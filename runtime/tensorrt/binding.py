"""What the native runner binds for one step, decided without a GPU.

The TensorRT plan comes from optimum's graph: the past KV of ``past`` positions comes in,
a present of ``past + new`` positions goes out, laid out (batch, kv heads, positions,
head dim). Every sequence remembers which of its stored positions are real (``valid``):
a truncated cache keeps its buffer and masks the positions it forgot, and rows of a batch
with different lengths are left-padded to the longest. The attention mask (0 for those
positions) and explicit position ids (the row's real length onwards) keep the numerics
those of an unpadded run.

* ``binding_plan``: which engine tensor gets what; an input or output we cannot feed is
  an error when the engine is opened, never a tensor left unbound.
* ``plan_step``: shapes, mask and positions of one step over a batch of rows.
* ``next_chunk``: which optimization profile runs the next chunk, and how many tokens.
* ``check_call``: TensorRT reports a refused shape or address by returning False.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe2edge.runtime.errors import BundleError

Ranges = dict[str, tuple[int, int, int]]


def check_call(ok: Any, call: str, hint: str = "") -> None:
    """TensorRT's setters and ``execute_async_v3`` return False instead of raising."""
    if not ok:
        raise BundleError(
            f"TensorRT refused {call}" + (f": {hint}" if hint else "") + " (see its log above)"
        )


@dataclass(frozen=True)
class BindingPlan:
    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    past: tuple[tuple[str, str], ...]  # (key, value) input per layer
    present: tuple[tuple[str, str], ...]  # (key, value) output per layer
    logits: str


def binding_plan(
    inputs: Sequence[str], outputs: Sequence[str], kv: dict[str, Any], num_layers: int
) -> BindingPlan:
    """Map every engine input and output to what the runner feeds or reads.

    ``kv``: the manifest's ``io.kv_cache`` (``past_key``, ... name templates). An engine
    tensor outside this plan, or a tensor of the plan the engine lacks, is a BundleError.
    """
    past = tuple(
        (kv["past_key"].format(layer=i), kv["past_value"].format(layer=i))
        for i in range(num_layers)
    )
    present = tuple(
        (kv["present_key"].format(layer=i), kv["present_value"].format(layer=i))
        for i in range(num_layers)
    )
    plan = BindingPlan(
        input_ids="input_ids",
        attention_mask="attention_mask" if "attention_mask" in inputs else None,
        position_ids="position_ids" if "position_ids" in inputs else None,
        past=past,
        present=present,
        logits="logits",
    )
    fed = {"input_ids", *(n for pair in past for n in pair)}
    fed |= {n for n in (plan.attention_mask, plan.position_ids) if n}
    read = {"logits", *(n for pair in present for n in pair)}
    problems = []
    if unknown := sorted(set(inputs) - fed):
        problems.append(f"inputs the runner cannot feed: {unknown}")
    if missing := sorted(fed - set(inputs)):
        problems.append(f"inputs the manifest names but the engine lacks: {missing}")
    if unknown := sorted(set(outputs) - read):
        problems.append(f"outputs the runner does not read: {unknown}")
    if missing := sorted(read - set(outputs)):
        problems.append(f"outputs missing from the engine: {missing}")
    if problems:
        raise BundleError(
            "this engine's tensors do not match optimum's decoder graph (input_ids, "
            "attention_mask, position_ids, past_key_values.*, logits, present.*): "
            + "; ".join(problems)
            + ". Export the bundle with `moe2edge export onnx` and rebuild the engine"
        )
    return plan


@dataclass
class StepPlan:
    batch: int
    new: int
    past: int  # stored positions per row in the past tensor (after left padding)
    pads: list[int]  # left padding added to each row's stored positions
    mask: np.ndarray  # (batch, past + new) int64: 1 for real positions
    positions: np.ndarray  # (batch, new) int64
    shapes: dict[str, tuple[int, ...]]


def plan_step(
    valid_rows: Sequence[np.ndarray], new: int, plan: BindingPlan, kv_heads: int, head_dim: int
) -> StepPlan:
    """Shapes and host inputs for ``new`` tokens after each row's stored positions.

    ``valid_rows[i]``: bool per stored position of row i (the row's ``slots``).
    """
    if not valid_rows or new < 1:
        raise ValueError("a step needs at least one row and one new token")
    past = max(len(v) for v in valid_rows)
    batch = len(valid_rows)
    pads = [past - len(v) for v in valid_rows]
    mask = np.zeros((batch, past + new), dtype=np.int64)
    positions = np.empty((batch, new), dtype=np.int64)
    for i, valid in enumerate(valid_rows):
        mask[i, pads[i] : past] = valid
        mask[i, past:] = 1
        positions[i] = int(np.count_nonzero(valid)) + np.arange(new)
    if plan.position_ids is None and (mask[:, :past] == 0).any():
        raise BundleError(
            "this engine has no position_ids input, so it cannot run padded or truncated "
            "rows; re-export the bundle with position_ids (optimum's default)"
        )
    shapes = {plan.input_ids: (batch, new)}
    if plan.attention_mask:
        shapes[plan.attention_mask] = (batch, past + new)
    if plan.position_ids:
        shapes[plan.position_ids] = (batch, new)
    for key, value in plan.past:
        shapes[key] = shapes[value] = (batch, kv_heads, past, head_dim)
    return StepPlan(batch, new, past, pads, mask, positions, shapes)


def valid_runs(valid: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of every run of real positions, to copy them without the gaps."""
    edges = np.diff(np.concatenate([[0], valid.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def ranges_from_shapes(
    ids: Sequence[Sequence[int]], past: Sequence[Sequence[int]]
) -> dict[str, tuple[int, int, int]]:
    """A profile's batch/new/past ranges from the engine's (min, opt, max) shapes of
    ``input_ids`` (batch, new) and of a past KV input (batch, heads, past, head_dim)."""
    return {
        "batch": tuple(int(s[0]) for s in ids),  # type: ignore[dict-item]
        "new": tuple(int(s[1]) for s in ids),  # type: ignore[dict-item]
        "past": tuple(int(s[2]) for s in past),  # type: ignore[dict-item]
    }


def next_chunk(
    profiles: dict[str, Ranges], batch: int, past: int, remaining: int, context: int
) -> tuple[str, int]:
    """The profile for the next chunk of ``remaining`` tokens over ``past`` stored
    positions, and how many tokens it takes (the most any covering profile allows).

    Raises BundleError when no profile covers this batch and past.
    """
    best: tuple[int, int, str] | None = None
    for name, r in profiles.items():
        if not (r["batch"][0] <= batch <= r["batch"][2] and r["past"][0] <= past <= r["past"][2]):
            continue
        size = min(remaining, r["new"][2], context - past)
        if size < r["new"][0]:
            continue
        rank = (size, name == "decode")  # equal sizes: the profile built for one token
        if best is None or rank > best[:2]:
            best = (*rank, name)  # type: ignore[assignment]
    if best is None:
        covered = {n: {k: r[k] for k in ("batch", "past")} for n, r in profiles.items()}
        raise BundleError(
            f"no optimization profile of this engine covers a batch of {batch} over {past} "
            f"cached positions (profiles: {covered}); rebuild the engine with a larger "
            "--max-batch or context"
        )
    return best[2], best[0]
