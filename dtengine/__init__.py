"""dtengine: pretrain image backbones by distilling a generative model's features (DreamTeacher).

The path of one batch: `data` (shards -> batches) -> `teachers` (images -> features) -> `students` (backbone +
regressor) -> `losses` / `ops` (feature regression) -> `Distiller` (the step) -> `train` (the loops). Everything
stands on `runtime` (errors, config, device, io, checkpoint, logging, flags).

    import dtengine
    distiller = dtengine.Distiller.from_config(dtengine.load_config("configs/demo.yaml"))
    losses = distiller(images, step=0)            # {"loss", "mse", "at"}
"""

from __future__ import annotations

from dtengine.version import __version__ as __version__

_EXPORTS = {
    "Distiller": "dtengine.distill",
    "TeacherTargets": "dtengine.distill",
    "RunConfig": "dtengine.train.run_config",
    "TrainConfig": "dtengine.train.run_config",
    "run_distillation": "dtengine.train.distillation",
    "DTEngineError": "dtengine.runtime.errors",
    "BackendError": "dtengine.runtime.errors",
    "SampleKeys": "dtengine.runtime.device",
    "feature_regression_loss": "dtengine.ops",
    "attention": "dtengine.ops",
    "TeacherLevel": "dtengine.levels",
    "DiffusionTeacher": "dtengine.teachers",
    "ADMTeacher": "dtengine.teachers",
    "TeacherConfig": "dtengine.teachers",
    "build_teacher": "dtengine.teachers",
    "describe_teacher": "dtengine.teachers",
    "build_diffusion_teacher": "dtengine.teachers",
    "DistillationStudent": "dtengine.students",
    "StudentConfig": "dtengine.students",
    "LossConfig": "dtengine.losses",
    "DistillConfig": "dtengine.losses",
    "DataConfig": "dtengine.data",
    "ShardStream": "dtengine.data",
    "export_backbone": "dtengine.export",
    "load_backbone": "dtengine.export",
}


def load_config(path=None, overrides=(), schema: type | None = None):
    """A run config from defaults, then the YAML file at `path`, then `key=value` overrides.

    `schema` defaults to `RunConfig` (what `dtengine distill` and `Distiller.from_config` take); pass another
    config dataclass (e.g. the eval or train-teacher config) to load that instead. Errors are one-line
    `ConfigError`s naming the key.
    """
    from dtengine.runtime.config import load_config as load_schema

    if schema is None:
        from dtengine.train.run_config import RunConfig as schema
    return load_schema(path, overrides, schema=schema)


def __getattr__(name: str):
    # Lazy, so `import dtengine` (and the CLI's --help) stays fast without importing torch/diffusers.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dtengine' has no attribute {name!r}")


__all__ = sorted([*_EXPORTS, "load_config"])
