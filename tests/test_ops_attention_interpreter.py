"""Runs tests/attention_interpreter_checks.py under TRITON_INTERPRET=1 in a fresh interpreter.

Triton chooses interpreted or compiled kernels at import time (for its own helpers too), so the interpreter
cannot share a process with the AOT-compile tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHECKS = Path(__file__).resolve().parent / "attention_interpreter_checks.py"


def test_triton_attention_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("DTENGINE_ATTENTION_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=CHECKS.parent.parent,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
