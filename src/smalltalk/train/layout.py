"""What a trainer run directory holds (`Trainer` writes it; experts, the dense baseline and `smalltalk train`
are such directories)::

    <run_dir>/
      checkpoints/step_{N:08d}/   resumable checkpoints (train/checkpoint.py)
      metrics.jsonl               one JSON object per logged step (train/metrics.py)
      tokenizer.json              the tokenizer the run trained with (a copy)
      model/                      the final weights, a model directory (model/io.py); written at the end
      run.json                    the run's summary; written last, so its presence means "finished"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data.tokenizer import TOKENIZER_FILE
from ..model.io import WEIGHTS_FILE


@dataclass(frozen=True)
class TrainerDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_FILE

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def summary(self) -> Path:
        return self.root / "run.json"

    def is_done(self) -> bool:
        return self.summary.is_file() and (self.model / WEIGHTS_FILE).is_file()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` in order ([] when there is none). A line cut short by a
    kill is skipped: the trainer truncates the file to its checkpoint when it resumes."""
    path = TrainerDir(run_dir).metrics
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
