"""A prepared split as the trainers and evaluations open it: its token dataset and its manifest facts.

    split = load_split("runs/x/data", "test")       # SplitData(dataset, split, num_bytes, tokenizer_file, sha)
    evenly_spaced(len(split.dataset), 512)          # a fixed subset that covers every domain of the split
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SmallTalkError
from .manifest import read_data_manifest
from .shards import TokenDataset


@dataclass
class SplitData:
    """A prepared split and the manifest facts evaluation and training need."""

    dataset: TokenDataset
    split: str
    num_bytes: int | None
    tokenizer_file: Path | None
    tokenizer_sha256: str | None

    @property
    def bytes_per_token(self) -> float | None:
        if not self.num_bytes:
            return None
        return self.num_bytes / self.dataset.num_tokens


def load_split(data_dir: str | Path, split: str) -> SplitData:
    """Open ``<data_dir>/<split>`` with the facts of ``<data_dir>/manifest.json`` (written by `smalltalk prepare`)."""
    data_dir = Path(data_dir)
    data = read_data_manifest(data_dir)
    splits = data.splits
    if split not in splits:
        raise SmallTalkError(f"{data_dir / 'manifest.json'}: no split {split!r} (has {sorted(splits)}); "
                             "choose another --split or re-run `smalltalk prepare`")
    info = splits[split]
    shard_files = [data_dir / s["file"] for s in info.get("shards", [])]
    dataset = TokenDataset(shard_files) if shard_files else TokenDataset.from_dir(data_dir / split)
    if len(dataset) == 0:
        raise SmallTalkError(f"{data_dir / split}: split {split!r} has no sequences; prepare more text or a "
                             "shorter --seq-len")
    num_bytes = info.get("num_bytes")
    return SplitData(dataset, split, int(num_bytes) if num_bytes else None, data.tokenizer_file,
                     data.tokenizer_identity())


def evenly_spaced(num_seqs: int, count: int) -> np.ndarray:
    """`count` sequence indices spread over [0, num_seqs) (all of them when count is 0 or too large):
    a fixed validation subset that still covers every domain of a domain-ordered split."""
    if count <= 0 or count >= num_seqs:
        return np.arange(num_seqs, dtype=np.int64)
    return np.unique(np.linspace(0, num_seqs - 1, count).round().astype(np.int64))
