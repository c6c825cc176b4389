"""Running Triton kernels on CPU in Triton's interpreter, which must be chosen before the
kernels' modules are imported: each check runs in a fresh Python process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

HAS_TRITON = importlib.util.find_spec("triton") is not None
REPO = Path(__file__).resolve().parents[1]


def run_in_interpreter(module: str, function: str, **env: str) -> None:
    """Call module.function() in a subprocess with TRITON_INTERPRET=1 (and `env`); assert it passed."""
    env = dict(os.environ, TRITON_INTERPRET="1", **env,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    code = f"from {module} import {function}; {function}()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
