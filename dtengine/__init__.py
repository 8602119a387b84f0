"""dtengine: pretrain image backbones by distilling a generative model's features (DreamTeacher).

The path of one batch: `data` (shards -> batches) -> `teachers` (images -> features) -> `students`
(backbone + regressor) -> `ops` / `losses` (feature regression) -> `train` (step, checkpoint, metrics).
"""

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "dtengine.config",
    "load_config": "dtengine.config",
    "DTEngineError": "dtengine.errors",
    "feature_regression_loss": "dtengine.ops",
    "DiffusionTeacher": "dtengine.teachers",
    "TeacherConfig": "dtengine.teachers",
    "DistillationStudent": "dtengine.students",
    "StudentConfig": "dtengine.students",
    "run_distillation": "dtengine.train.trainer",
    "export_backbone": "dtengine.export",
}


def __getattr__(name: str):
    # Lazy, so `import dtengine` (and the CLI's --help) stays fast without importing torch/diffusers.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dtengine' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
