"""A run's metrics: one JSON line per step and per evaluation, and the loss/accuracy plot drawn from them.

The log knows its size, so a checkpoint can record it and a resumed run can cut off what was logged after it: the
resumed metrics read as if the run had never stopped.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from softprompt.files import atomic_write_bytes


class MetricsLog:
    """Appends JSON lines to a run's ``metrics.jsonl`` (on the main process only; elsewhere it writes nothing).

    Args:
        path: the file.
        enabled: False on processes other than the main one.
    """

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.size = 0
        """Bytes written so far: what a checkpoint records."""

    def start(self) -> None:
        """Starts the log empty (a run from scratch)."""
        if self.enabled:
            atomic_write_bytes(self.path, b"")
        self.size = 0

    def resume_at(self, size: int) -> int:
        """Continues the log where a checkpoint left it: cut to the `size` bytes it recorded, dropping what was
        logged after it.

        A log shorter than that (deleted or cut since) is kept as it is, up to its last complete line, and never
        padded: the records it lost are not invented.

        Args:
            size: the log's length when the checkpoint was written.

        Returns:
            The bytes the log held before (fewer than `size` when records were lost).
        """
        if not self.enabled:
            self.size = size
            return size
        found = self.path.stat().st_size if self.path.is_file() else 0
        keep = size
        if found < size:
            payload = self.path.read_bytes() if found else b""
            keep = payload.rfind(b"\n") + 1  # a torn last line would join the next record
        with open(self.path, "ab") as file:
            file.truncate(keep)
        self.size = keep
        return found

    def append(self, record: dict[str, Any]) -> None:
        """Appends one record as a JSON line (non-finite floats as null)."""
        if not self.enabled:
            return
        line = (json.dumps(_finite_or_none(record)) + "\n").encode()
        with open(self.path, "ab") as file:
            file.write(line)
            file.flush()
        self.size += len(line)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN / Infinity: such floats are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (a torn last line from a killed process is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(metrics_path: str | Path, png_path: str | Path, title: str | None = None) -> Path:
    """Draws training loss per step with evaluation loss, and evaluation accuracy (the generated label's and rank
    classification's) or perplexity, to a PNG.

    Uses matplotlib's Agg canvas directly, so no global backend is set and no display is needed.

    Args:
        metrics_path: the run's ``metrics.jsonl``.
        png_path: where the PNG goes (written atomically).
        title: the figure's title, e.g. the method and base model.

    Returns:
        ``png_path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train_records = [r for r in records if r["event"] == "train" and r.get("loss") is not None]
    eval_records = [r for r in records if r["event"] == "eval" and r.get("loss") is not None]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, score_axes = figure.subplots(1, 2)
    loss_axes.plot([r["step"] for r in train_records], [r["loss"] for r in train_records], label="train loss",
                   linewidth=1, alpha=0.7)
    loss_axes.plot([r["step"] for r in eval_records], [r["loss"] for r in eval_records], "o-", label="eval loss")
    loss_axes.set_xlabel("optimizer step")
    loss_axes.set_ylabel("loss (mean over labelled tokens)")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    if any(r.get("accuracy") is not None for r in eval_records):
        for key, label, color in (("accuracy", "generated label", "tab:green"),
                                  ("rank_accuracy", "rank classification", "tab:orange")):
            scored = [r for r in eval_records if r.get(key) is not None]
            if scored:
                score_axes.plot([r["epoch"] for r in scored], [r[key] for r in scored], "o-", color=color,
                                label=label)
        score_axes.set_ylabel("eval accuracy")
        score_axes.set_ylim(-0.02, 1.02)
        score_axes.legend()
    else:
        score_axes.plot([r["epoch"] for r in eval_records], [r.get("perplexity") for r in eval_records], "o-",
                        color="tab:purple")
        score_axes.set_ylabel("eval perplexity")
        score_axes.set_yscale("log")
    score_axes.set_xlabel("epoch")
    score_axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(Path(png_path), buffer.getvalue())
    return Path(png_path)


