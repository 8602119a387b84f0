"""Results out: aggregation (mean, std over seeds), the terminal table, eval.json and the bar chart."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from dtengine.runtime.io import atomic_write

METRICS = {
    "dense_miou": "dense probe mIoU",
    "dense_pixel_acc": "dense probe pixel acc",
    "global_top1": "global probe top-1",
    "finetune_miou": "fine-tune mIoU",
}
"""Reported metric key -> label in the table and chart."""


def aggregate(per_seed: list[float]) -> dict[str, Any]:
    """{"per_seed", "mean", "std"}; std is the sample std (n - 1), 0.0 for a single seed."""
    std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    return {"per_seed": per_seed, "mean": statistics.fmean(per_seed), "std": std}


def _table_rows(models: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = [["model", *METRICS.values()]]
    for name, result in models.items():
        cells = [name]
        for key in METRICS:
            value = result["metrics"].get(key)
            cells.append("n/a" if value is None else f"{value['mean']:.3f} ± {value['std']:.3f}")
        rows.append(cells)
    return rows


def format_table(models: dict[str, dict[str, Any]]) -> str:
    """Rows = models, columns = metrics, cells "mean ± std" ("n/a" where a metric does not apply)."""
    rows = _table_rows(models)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown(models: dict[str, dict[str, Any]]) -> str:
    """The same table as `format_table`, as a Markdown table (for READMEs and issue notes)."""
    rows = _table_rows(models)
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


SIGNIFICANT_STDS = 3.0
"""A model beats the reference on a metric when its mean margin exceeds this many standard deviations."""


def margins_over(models: dict[str, dict[str, Any]], reference: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Every other model's margin over `reference`, per metric both have.

    The noise scale is the larger of the two models' std over seeds (conservative: neither model's spread may
    explain the margin). With a single seed there is no spread, so nothing is called significant.

    Returns:
        {model: {metric: {"margin", "std", "stds", "significant"}}}; "stds" is None when std is 0.
    """
    ref = models[reference]["metrics"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, result in models.items():
        if name == reference:
            continue
        rows = {}
        for key, value in result["metrics"].items():
            if key not in ref:
                continue
            margin = value["mean"] - ref[key]["mean"]
            std = max(value["std"], ref[key]["std"])
            stds = margin / std if std > 0 else None
            rows[key] = {
                "margin": margin, "std": std, "stds": stds,
                "significant": stds is not None and stds > SIGNIFICANT_STDS,
            }  # fmt: skip
        out[name] = rows
    return out


def format_margins(margins: dict[str, dict[str, dict[str, Any]]], reference: str = "random") -> str:
    """One line per model: its margin over `reference` on each metric, in absolute terms and in stds."""
    lines = [f"margin over {reference} (mean difference; in units of the larger std over seeds; * = > 3 std):"]
    for name, rows in margins.items():
        cells = []
        for key, row in rows.items():
            stds = "n/a" if row["stds"] is None else f"{row['stds']:+.1f} std"
            cells.append(f"{METRICS[key]} {row['margin']:+.3f} ({stds}){' *' if row['significant'] else ''}")
        lines.append(f"  {name}: " + "; ".join(cells))
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON, atomically."""
    atomic_write(path, json.dumps(payload, indent=2))
    return path


def plot_results(path: Path, models: dict[str, dict[str, Any]], title: str = "") -> Path:
    """Grouped bar chart: one group per metric, one bar per model, std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(models)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(2.2 * len(METRICS) + 1, 4))
    for i, name in enumerate(names):
        means, stds, xs = [], [], []
        for j, key in enumerate(METRICS):
            value = models[name]["metrics"].get(key)
            if value is not None:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                means.append(value["mean"])
                stds.append(0.0 if math.isnan(value["std"]) else value["std"])
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=name)
    # Two-line tick labels: one-line ones run into each other at this width.
    ax.set_xticks(range(len(METRICS)), [label.replace(" ", "\n", 1) for label in METRICS.values()])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (held-out)")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
