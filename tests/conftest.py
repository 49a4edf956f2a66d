"""Shared fixtures: the real sample corpus, and small prepared token datasets built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from smalltalk.paths import default_corpus_dir

# Tests run on 2 cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    path = default_corpus_dir()
    if not (path / "train").is_dir():
        pytest.fail(f"sample corpus not found at {path}; set SMALLTALK_CORPUS")
    return path
