"""The kernels folder installs as `dtkernels` and never imports the engine."""

from __future__ import annotations

import subprocess
import sys


def test_dtkernels_imports_without_the_engine():
    code = "import sys, dtkernels; assert 'dtengine' not in sys.modules, 'dtkernels imported dtengine'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
