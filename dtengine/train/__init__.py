"""The loops: distillation (around the `Distiller` step), teacher (DDPM) training and interpreter training."""

from dtengine.train.distillation import RunConfig, RunResult, TrainConfig, run_distillation
from dtengine.train.optim import OptimConfig

__all__ = ["OptimConfig", "RunConfig", "RunResult", "TrainConfig", "run_distillation"]
