"""Provenance: which code made a run, a pipeline spec or a registered model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The code's git commit: CTV2V_GIT_COMMIT (set in images), else `git rev-parse HEAD`, else "unknown"."""
    from_env = os.environ.get("CTV2V_GIT_COMMIT")
    if from_env:
        return from_env
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"
