"""Where the repository is, so shipped files (data, artifacts, model tables) load from any working directory.

    >>> (REPO_ROOT / "dspy_ray").is_dir()
    True
    >>> repo_path("data/triage_dev.jsonl").is_file()
    True
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_path(path: str | os.PathLike) -> Path:
    """``path`` as given when it is absolute or exists from here, else relative to the repository.

    Serve builds its apps in another working directory, and Ray workers start in their own; a
    relative path that names a shipped file still finds it.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p
