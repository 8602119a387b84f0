"""`dtengine eval`: parse, build the EvalConfig, run, print. Wired into `dtengine.cli` with `add_eval_command`."""

from __future__ import annotations

import argparse

from dtengine.eval.config import BASELINES


def _eval(args: argparse.Namespace) -> None:
    from dtengine.eval.config import EvalConfig
    from dtengine.eval.runner import run_evaluation
    from dtengine.runtime.config import load_config

    cfg = load_config(args.config, args.overrides, schema=EvalConfig)
    result = run_evaluation(cfg, args.checkpoint, args.baseline or [], args.seeds, args.out, args.compare or [])
    print(result.table)
    print(f"eval.json: {result.json_path}")
    print(f"chart: {result.chart_path}")
    print(f"took {result.results['seconds']:.0f} s on {result.results['device']}")


def add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `eval` on the CLI's subparsers; the handler receives the parsed Namespace."""
    parser = subparsers.add_parser("eval", help="probe and fine-tune a distilled backbone against baselines")
    parser.add_argument(
        "--checkpoint", required=True, metavar="RUN_OR_FILE",
        help="distill run directory, step_*.pt, or exported backbone.safetensors (with its backbone.json)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", action="append", choices=BASELINES,
        help="also evaluate this model under the same protocol (repeatable); supervised is the positive control",
    )  # fmt: skip
    parser.add_argument(
        "--compare", action="append", metavar="LABEL=RUN",
        help="also evaluate another distilled student (repeatable), e.g. untrained=runs/control",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=1, help="repeats of every metric; mean and std are reported")
    parser.add_argument("--config", help="YAML file for EvalConfig")
    parser.add_argument("--out", help="report folder (default: <run dir>/eval)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. probe.epochs=20 finetune.images=50")
    parser.set_defaults(func=_eval)
