"""Errors a user can act on.

Every error raised for bad input (config, data, teacher, student, output directory, checkpoint) is a
`DTEngineError`: the CLI prints its message on one line and exits non-zero, with no traceback unless
`--debug` is given. The message names the thing that is wrong and what to do about it.
"""


class DTEngineError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class ConfigError(DTEngineError):
    """Unknown config key, wrong type or value out of range."""


class DataError(DTEngineError):
    """Shards missing, unreadable or corrupt."""


class TeacherError(DTEngineError):
    """Teacher directory missing, not a diffusers model, or asked for blocks it does not have."""


class StudentError(DTEngineError):
    """Unknown timm model, or student levels that cannot be matched to the teacher's."""


class CheckpointError(DTEngineError):
    """Checkpoint missing, unreadable, or written for a different architecture."""


class OutputDirError(DTEngineError):
    """Output directory not writable or already holding a run."""


class BackendError(DTEngineError):
    """An op was asked for an implementation (backend) that cannot run the call it was given."""
