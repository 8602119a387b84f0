"""The run directory: created and checked for writability before any compute starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dtengine.errors import OutputDirError
from dtengine.train.checkpoint import list_checkpoints


def prepare_run_dir(out_dir: str | Path, resuming: bool) -> Path:
    """Create `out_dir` if needed and prove it is writable.

    Refuses to start a fresh run in a directory that already holds checkpoints, so nothing already written
    is overwritten by accident.
    """
    run_dir = Path(out_dir).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputDirError(
            f"output directory '{run_dir}' is not writable ({err.strerror or err}); choose another with out_dir=DIR"
        ) from err
    if not os.access(run_dir, os.W_OK):
        raise OutputDirError(f"output directory '{run_dir}' is not writable; choose another with out_dir=DIR")
    if not resuming and list_checkpoints(run_dir / "checkpoints"):
        raise OutputDirError(
            f"output directory '{run_dir}' already holds a run; pass --resume to continue it or choose a new out_dir"
        )
    return run_dir
