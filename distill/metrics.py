"""Run logging: ``metrics.jsonl``, TensorBoard scalars, and a PNG of the curves.

Records are dicts with a ``step`` and a ``split`` (``train`` or ``eval``); every numeric
field becomes a TensorBoard scalar ``split/field``. On resume, records at or after the
resumed step are dropped from ``metrics.jsonl`` (they were written after the checkpoint by
the interrupted run and will be written again), and TensorBoard is told to purge them; a
fresh run (step 0) starts an empty file.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

from moe2edge.fileio import atomic_write

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return out


def truncate_metrics(path: str | Path, from_step: int) -> None:
    """Keep only records before ``from_step`` (atomically)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [r for r in read_metrics(path) if r.get("step", -1) < from_step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))


class RunLogger:
    """Appends records to ``run_dir/metrics.jsonl`` and TensorBoard; inert when not enabled."""

    def __init__(
        self,
        run_dir: str | Path,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = None
        self.writer = None
        if not enabled:
            return
        truncate_metrics(self.path, start_step)  # a fresh run (0) starts a fresh file
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                log_dir=str(Path(run_dir) / "tensorboard"),
                purge_step=start_step,
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    if not isinstance(value, bool) and math.isfinite(value):
                        self.writer.add_scalar(f"{split}/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


PLOTS = (
    ("train", ("loss", "kd", "ce"), "training loss"),
    ("train", ("lr",), "learning rate"),
    ("train", ("grad_norm",), "gradient norm"),
    ("eval", ("heldout_kl",), "held-out KL(teacher || student)"),
    ("eval", ("top1_agreement", "task_acc", "reply_wellformed"), "held-out agreement / task"),
    ("eval", ("perplexity",), "held-out perplexity"),
)


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """One PNG with a panel per curve family that has data; None if there is nothing."""
    records = read_metrics(metrics_path)
    panels = []
    for split, keys, title in PLOTS:
        series = {}
        for key in keys:
            pts = [
                (r["step"], r[key])
                for r in records
                if r.get("split", "train") == split and isinstance(r.get(key), (int, float))
            ]
            if pts:
                series[key] = pts
        if series:
            panels.append((title, series))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3 if len(panels) > 2 else len(panels)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels, strict=False):
        for key, pts in series.items():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if len(series) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return atomic_write(png_path, png.getvalue())
