"""A prepared split as the trainers and evaluations open it: its token dataset and its manifest facts.

    split = load_split("runs/x/data", "test")       # SplitData(dataset, split, num_bytes, tokenizer_file, sha)
    evenly_spaced(len(split.dataset), 512)          # a fixed subset that covers every domain of the split
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SmallTalkError
from ..io import read_json, sha256_file
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


def split_sizes(data_dir: str | Path) -> dict[str, int]:
    """{split: sequences} as ``<data_dir>/manifest.json`` lists them (train, valid, test, ... as prepared)."""
    manifest = read_json(Path(data_dir) / "manifest.json")
    splits = manifest.get("splits", {}) if isinstance(manifest, dict) else {}
    return {name: int(info.get("num_seqs", 0)) for name, info in splits.items()}


def load_split(data_dir: str | Path, split: str) -> SplitData:
    """Open ``<data_dir>/<split>`` with the facts of ``<data_dir>/manifest.json`` (written by `smalltalk prepare`)."""
    data_dir = Path(data_dir)
    manifest = read_json(data_dir / "manifest.json")
    splits = manifest.get("splits", {}) if isinstance(manifest, dict) else {}
    if split not in splits:
        raise SmallTalkError(f"{data_dir / 'manifest.json'}: no split {split!r} (has {sorted(splits)}); "
                             "choose another --split or re-run `smalltalk prepare`")
    info = splits[split]
    shard_files = [data_dir / s["file"] for s in info.get("shards", [])]
    dataset = TokenDataset(shard_files) if shard_files else TokenDataset.from_dir(data_dir / split)
    if len(dataset) == 0:
        raise SmallTalkError(f"{data_dir / split}: split {split!r} has no sequences; prepare more text or a "
                             "shorter --seq-len")
    tok = manifest.get("tokenizer", {}) or {}
    tokenizer_file = data_dir / tok.get("file", "tokenizer.json")
    tokenizer_file = tokenizer_file if tokenizer_file.is_file() else None
    # The sha of the file's bytes is the identity models record (model/io.py hashes the same way).
    sha = sha256_file(tokenizer_file) if tokenizer_file is not None else tok.get("sha256")
    num_bytes = info.get("num_bytes")
    return SplitData(dataset, split, int(num_bytes) if num_bytes else None, tokenizer_file, sha)


def evenly_spaced(num_seqs: int, count: int) -> np.ndarray:
    """`count` sequence indices spread over [0, num_seqs) (all of them when count is 0 or too large):
    a fixed validation subset that still covers every domain of a domain-ordered split."""
    if count <= 0 or count >= num_seqs:
        return np.arange(num_seqs, dtype=np.int64)
    return np.unique(np.linspace(0, num_seqs - 1, count).round().astype(np.int64))
