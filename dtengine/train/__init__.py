"""The loops: distillation (around the `Distiller` step), teacher (DDPM) training and interpreter training."""

from dtengine.train.distillation import RunResult, run_distillation
from dtengine.train.optim import OptimConfig
from dtengine.train.run_config import RunConfig, TrainConfig

__all__ = ["OptimConfig", "RunConfig", "RunResult", "TrainConfig", "run_distillation"]
