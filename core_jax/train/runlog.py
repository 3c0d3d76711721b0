"""What a person watching a run sees and keeps: a progress bar, metrics.jsonl, TensorBoard
events and, at the end, a PNG of the loss curves."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core_jax.files import atomic_write_bytes

_SHOWN = ("loss", "diffusion", "emb", "attn", "pairwise", "hinge")


class MetricsLog:
    """One run's record: metrics.jsonl (one line per logged step) and TensorBoard events."""

    def __init__(self, folder: Path, start_step: int):
        self.path = folder / "metrics.jsonl"
        self._drop_lines_after(start_step)  # steps logged after the restored checkpoint redo
        self.file = self.path.open("a")
        self.tensorboard = None
        try:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(folder / "tensorboard"))
        except ImportError:  # TensorBoard is a convenience; metrics.jsonl is the record
            pass

    def _drop_lines_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= step]
        # Rewritten aside and renamed: a run killed right here keeps its whole history.
        atomic_write_bytes(self.path, lambda: "".join(ln + "\n" for ln in kept).encode())

    def scalars(self, stage: int, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"stage{stage}/{name}", value, step)

    def image(self, tag: str, step: int, grid: np.ndarray) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, grid, step, dataformats="HWC")

    def last(self) -> dict[str, Any]:
        """The last record written (the final loss terms once a run is done)."""
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        return json.loads(lines[-1]) if lines else {}

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class Progress:
    """The bar a person watches: steps of a pack, speed, and the first run's main terms."""

    def __init__(self, total_steps: int, start_step: int, label: str = ""):
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        desc=label or None)
        self._last_time, self._last_step = time.perf_counter(), start_step

    def update(self, stage: int, step: int, values: dict[str, float]) -> float:
        """Advance to `step`; returns the steps per second since the last update."""
        now = time.perf_counter()
        steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        shown = {k: f"{values[k]:.4g}" for k in _SHOWN if k in values}
        self.bar.set_postfix(stage=stage, **shown, it_s=f"{steps_per_s:.2f}")
        self.bar.update(step - self.bar.n)
        return steps_per_s

    def close(self) -> None:
        self.bar.close()


def _step_of(line: str) -> float:
    """A record's step; blank or torn lines (a write cut short by a kill) count as after all."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def plot_loss_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """One panel per logged loss term, both stages on a shared step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    terms = [t for t in _SHOWN if any(t in r for r in records)]
    if not records or not terms:
        return None
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
    for ax, term in zip(axes[0], terms, strict=True):
        for stage in sorted({r["stage"] for r in records}):
            points = [(r["step"], r[term]) for r in records if r["stage"] == stage and term in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=f"stage {stage}")
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_path, png.getvalue())
    return out_path
