"""The codebase stays ruff-clean (config in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess

from tests.conftest import PROJECT_ROOT


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -r requirements-dev.txt"
    result = subprocess.run([ruff, "check", "."], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
