"""Evaluation: do the distilled features beat random init? Frozen probes, label-efficient fine-tuning, controls.

`dtengine eval --checkpoint RUN [--baseline random|teacher|supervised] [--seeds K]` runs the same protocol on
every model (see `runner.run_evaluation`): (a) a dense linear probe, (b) a global linear probe, (c) fine-tuning
on a few labelled images; it writes a terminal table, `eval.json` and `eval.png`.
"""

from dtengine.eval.config import BASELINES, EvalConfig

__all__ = ["BASELINES", "EvalConfig", "EvalResult", "run_evaluation"]


def __getattr__(name: str):
    # Lazy, so registering the `eval` command does not import torch for every CLI call.
    if name in ("EvalResult", "run_evaluation"):
        from dtengine.eval import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'dtengine.eval' has no attribute {name!r}")
