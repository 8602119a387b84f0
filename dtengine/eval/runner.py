"""One evaluation: load the data and the models, run every metric for every seed, write the report."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from dtengine.data.labelled import load_labelled_split
from dtengine.eval.config import BASELINES, EvalConfig
from dtengine.eval.finetune import finetune_segmentation
from dtengine.eval.probes import cache_features, dense_linear_probe, global_linear_probe
from dtengine.eval.report import (
    aggregate,
    format_margins,
    format_markdown,
    format_table,
    margins_over,
    plot_results,
    write_json,
)
from dtengine.eval.sources import load_student_checkpoint, random_source, teacher_source
from dtengine.eval.supervised import supervised_source
from dtengine.runtime.config import config_to_dict
from dtengine.runtime.device import resolve_device
from dtengine.runtime.errors import ConfigError
from dtengine.runtime.io import atomic_write, prepare_output_dir
from dtengine.version import __version__


@dataclass
class EvalResult:
    """Where the report went and what it says."""

    out_dir: Path
    json_path: Path
    chart_path: Path
    table: str
    results: dict[str, Any]
    """The eval.json payload."""


SEEDED_BASELINES = ("random", "supervised")
"""Baselines rebuilt for every seed: their initialisation is part of what a repeat varies, not only the probes'."""


def _parse_compare(compare: Sequence[str]) -> dict[str, str]:
    runs: dict[str, str] = {}
    for item in compare:
        label, sep, path = item.partition("=")
        if not sep or not label or not path or label in ("student", *BASELINES) or label in runs:
            raise ConfigError(
                f"--compare wants LABEL=RUN with a new label (not student, {', '.join(BASELINES)}), got {item!r}"
            )
        runs[label] = path
    return runs


def run_evaluation(
    cfg: EvalConfig, checkpoint: str, baselines: Sequence[str] = (), seeds: int = 1, out_dir: str | None = None,
    compare: Sequence[str] = (),
) -> EvalResult:  # fmt: skip
    """Evaluate a distilled student and the requested baselines under one protocol; write the report.

    Args:
        cfg: the protocol.
        checkpoint: run directory, step_*.pt, or exported backbone.safetensors.
        baselines: any of "random", "teacher", "supervised" (duplicates ignored).
        seeds: repeats of every metric, with seeds cfg.seed .. cfg.seed + seeds - 1. A repeat re-draws the probes'
            and fine-tuning's initialisation and batch order, and rebuilds the random and supervised baselines.
        out_dir: report folder (None = `<run dir>/eval`).
        compare: "LABEL=RUN" items: more distilled students evaluated beside the first (e.g. the untrained-teacher
            control run).

    Returns:
        The report's paths, table and numbers.

    Raises:
        DTEngineError: bad checkpoint, data, config or output directory (one-line messages).
    """
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown or seeds < 1:
        raise ConfigError(f"--baseline must be among {BASELINES} and --seeds >= 1; got {unknown or seeds}")
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    student = load_student_checkpoint(checkpoint)
    compared = {label: load_student_checkpoint(path) for label, path in _parse_compare(compare).items()}
    out = prepare_output_dir(
        Path(out_dir) if out_dir else student.run_dir / "eval", "eval output directory", "pass --out DIR"
    )
    data, show = cfg.data, cfg.progress
    train, val = (
        load_labelled_split(
            shards, data.image_size, builtin_root=data.builtin_root, limit=limit, num_classes=data.num_classes,
            progress=show,
        )
        for shards, limit in ((data.train_shards, data.max_train_images), (data.val_shards, data.max_val_images))
    )  # fmt: skip
    if cfg.teacher_path:
        student.teacher.path = cfg.teacher_path
    builders: dict[str, Callable[[int], torch.nn.Module]] = {
        "student": lambda seed: student.source,
        **{label: (lambda seed, run=run: run.source) for label, run in compared.items()},
        "random": lambda seed: random_source(student.model_name, seed),
        "teacher": lambda seed: teacher_source(student.teacher, cfg.seed, device),
        "supervised": lambda seed: supervised_source(
            student.model_name, train, data.num_classes, cfg.supervised, seed, device, show
        ),
    }
    seed_list = [cfg.seed + k for k in range(seeds)]
    models: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(["student", *compared, *baselines]):
        model_start = time.perf_counter()
        print(f"eval: {name}", flush=True)
        runs: dict[str, list[float]] = {"dense_miou": [], "dense_pixel_acc": [], "global_top1": []}
        source = None
        for seed in seed_list:
            if source is None or name in SEEDED_BASELINES:
                source = builders[name](seed).to(device)
                train_feats, val_feats = cache_features(source, train, val, data.batch_size, device, show)
            dense = dense_linear_probe(
                train_feats, train.seg, val_feats, val.seg, data.num_classes, cfg.probe, seed, show
            )
            runs["dense_miou"].append(dense["miou"])
            runs["dense_pixel_acc"].append(dense["pixel_acc"])
            runs["global_top1"].append(global_linear_probe(
                train_feats, train.cls, val_feats, val.cls, data.num_classes, cfg.probe, seed
            )["top1"])  # fmt: skip
            if source.finetunable:
                runs.setdefault("finetune_miou", []).append(finetune_segmentation(
                    source, train, val, data.num_classes, cfg.finetune, seed, device, data.batch_size, show
                )["miou"])  # fmt: skip
        del train_feats, val_feats
        models[name] = {
            "metrics": {key: aggregate(values) for key, values in runs.items()},
            "channels": list(source.channels),
            "seconds": round(time.perf_counter() - model_start, 1),
        }
    payload = {
        "checkpoint": student.description,
        "compared": {label: run.description for label, run in compared.items()},
        "student_model": student.model_name,
        "teacher": config_to_dict(student.teacher),
        "seeds": seed_list,
        "models": models,
        "versus_random": margins_over(models, "random") if "random" in models else {},
        "protocol": config_to_dict(cfg),
        "data": {"train_images": len(train), "val_images": len(val), "skipped_corrupt": train.skipped_corrupt},
        "versions": {
            "dtengine": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
        "device": str(device) if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "seconds": round(time.perf_counter() - started, 1),
    }
    table = format_table(models)
    if payload["versus_random"]:
        table += "\n\n" + format_margins(payload["versus_random"])
    json_path = write_json(out / "eval.json", payload)
    markdown = format_markdown(models)
    if payload["versus_random"]:
        markdown += "\n\n```\n" + format_margins(payload["versus_random"]) + "\n```"
    atomic_write(out / "eval.md", markdown + "\n")
    title = f"{student.model_name}: {Path(student.description).name}, held-out, mean ± std over {seeds} seed(s)"
    chart = plot_results(out / "eval.png", models, title=title)
    return EvalResult(out, json_path, chart, table, payload)
