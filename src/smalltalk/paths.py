"""Where the sample corpus and eval data live.

Defaults for this checkout are ``../shared/corpus`` and ``../shared/evals`` (relative to the
current directory, then to the repository root); the environment variables ``SMALLTALK_CORPUS``
and ``SMALLTALK_EVALS`` and the CLI flags ``--corpus`` / ``--evals`` override them.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _default(env: str, rel: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    for base in (Path.cwd(), REPO_ROOT):
        candidate = (base / rel).resolve()
        if candidate.exists():
            return candidate
    return (Path.cwd() / rel).resolve()


def default_corpus_dir() -> Path:
    return _default("SMALLTALK_CORPUS", "../shared/corpus")


def default_evals_dir() -> Path:
    return _default("SMALLTALK_EVALS", "../shared/evals")
