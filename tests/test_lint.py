"""The codebase stays ruff-clean (config in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import PROJECT_ROOT


def test_ruff_is_clean() -> None:
    # `python -m ruff` of this interpreter: works from a fresh venv that was never activated (no ruff on PATH).
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
