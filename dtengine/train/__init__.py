"""Training: the distillation loop and its components (optimizer, checkpoint, metrics, device, run dir)."""

from dtengine.train.checkpoint import CheckpointConfig
from dtengine.train.optim import OptimConfig
from dtengine.train.trainer import RunResult, TrainConfig, run_distillation

__all__ = ["CheckpointConfig", "OptimConfig", "RunResult", "TrainConfig", "run_distillation"]
