"""Logging sinks and meters: metrics JSONL + TensorBoard, step-window averages, the progress bar, the loss plot.

`StepWindow` keeps tensor-valued sums on their device and pulls them to the host in one transfer, only when a
metrics row is written, so the hot loop never waits for the GPU to report a loss.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dtengine.runtime.io import atomic_write


class MetricsLogger:
    """Appends `{"step": ..., name: value}` rows to `metrics.jsonl` and mirrors them to TensorBoard.

    Rows are strict JSON: a non-finite value is written as null. Opening the file repairs it for the run at hand:
    a last line cut short by a crash is dropped; a resumed run drops the rows after its checkpoint's step (they are
    about to be written again); a fresh run moves a file left by an earlier attempt aside instead of appending.

    Args:
        run_dir: the run's folder.
        tensorboard: also write TensorBoard events.
        resume_step: the step a resumed run continues from; None for a fresh run.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.is_file():
            self._repair(resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def _repair(self, resume_step: int | None) -> None:
        if resume_step is None:
            self.path.rename(self.path.with_name(f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run killed while writing it
            if row.get("step", 0) <= resume_step:
                kept.append(line + "\n")
        atomic_write(self.path, "".join(kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **{k: _json_value(v) for k, v in values.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        if self.writer is not None:
            for name, value in row.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _json_value(value: Any) -> Any:
    if hasattr(value, "__float__") and not isinstance(value, (int, str)):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN or Infinity
    return value


class StepWindow:
    """Running sums of logged quantities between two metrics rows.

    `add_tensors` accumulates 0-dim tensors where they live (fp64, detached); `add` accumulates host numbers
    (images, seconds waited, counts). `pull` returns every sum as a Python float, moving the tensors to the host
    in one transfer, with the window's wall time as "seconds", and starts a new window.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._tensors: dict[str, Tensor] = {}
        self._numbers: dict[str, float] = {}
        self._started = time.perf_counter()

    def add_tensors(self, values: dict[str, Tensor], scale: float = 1.0) -> None:
        for name, value in values.items():
            value = value.detach().double() * scale
            self._tensors[name] = value if name not in self._tensors else self._tensors[name] + value

    def add(self, **values: float) -> None:
        for name, value in values.items():
            self._numbers[name] = self._numbers.get(name, 0.0) + value

    def restart_clock(self) -> float:
        """Start the window's clock (and its image count) again, keeping the sums: used after a warm-up step, so
        img/s is steady-state throughput. Returns the seconds the clock had run."""
        elapsed = time.perf_counter() - self._started
        self._numbers.pop("images", None)
        self._started = time.perf_counter()
        return elapsed

    def pull(self, reduce=None) -> dict[str, float]:
        """Every sum as a Python float; `reduce` maps the stacked tensor sums first (e.g. a mean over ranks)."""
        names = list(self._tensors)
        pulled = []
        if names:
            stacked = torch.stack([self._tensors[n] for n in names])
            pulled = (reduce(stacked) if reduce else stacked).cpu().tolist()
        sums = {**self._numbers, **dict(zip(names, pulled)), "seconds": time.perf_counter() - self._started}
        self._reset()
        return sums


def progress_bar(total: int, desc: str, *, initial: int = 0, enabled: bool = True, unit: str = "step") -> tqdm:
    """The progress bar of every long loop: steps done, rate, elapsed and ETA; loops add img/s and the loss."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def parse_step_range(spec: str) -> tuple[int, int] | None:
    """ "A:B" -> (A, B) with 1 <= A <= B; "" -> None. Raises ValueError otherwise."""
    if not spec:
        return None
    first, sep, last = spec.partition(":")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit() or not 1 <= int(first) <= int(last):
        raise ValueError(f"expected A:B with 1 <= A <= B (e.g. 10:12), got {spec!r}")
    return int(first), int(last)


class StepProfiler:
    """torch.profiler over optimizer steps A..B of a run (1-based), written as a Chrome trace into `out_dir`.

    Call `step(n)` after step n finishes: profiling starts before step A and the trace is written after step B.
    """

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path):
        self.steps, self.out_dir, self._profile, self.trace = steps, Path(out_dir), None, None
        if steps is not None and steps[0] == 1:
            self._start()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profile = profile(activities=activities, record_shapes=True, with_stack=False)
        self._profile.__enter__()

    def step(self, finished: int) -> None:
        if self.steps is None:
            return
        first, last = self.steps
        if finished == first - 1 and self._profile is None:
            self._start()
        if finished == last and self._profile is not None:
            self._profile.__exit__(None, None, None)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.trace = self.out_dir / f"trace_steps_{first}-{last}.json"
            self._profile.export_chrome_trace(str(self.trace))
            self._profile = None

    def close(self) -> None:
        """End a profile still running (the run stopped inside the range), keeping what it saw."""
        if self._profile is not None:
            self._profile.__exit__(None, None, None)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.trace = self.out_dir / f"trace_steps_{self.steps[0]}-{self.steps[1]}_partial.json"
            self._profile.export_chrome_trace(str(self.trace))
            self._profile = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path, keys: tuple[str, ...] = ("loss", "mse", "at")) -> Path | None:
    """Plot each of `keys` against step, one panel per key; returns the PNG path or None if there is no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    keys = tuple(k for k in keys if any(k in row for row in rows))
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, style in ((key, "-"), (f"val_{key}", "o-")):  # held-out values beside the training curve
            points = [(row["step"], row[name]) for row in rows if name in row]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, lw=1.5, ms=3, label=name)
        if any(f"val_{key}" in row for row in rows):
            ax.legend(fontsize=7)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(Path(metrics_path).parent.name)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
