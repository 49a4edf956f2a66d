"""The token dataset on disk: ``<data_dir>/manifest.json`` and how to read it back.

Written last (atomically) by `smalltalk prepare` and by sharding (one dataset per expert): a data directory
without it is not a dataset. Keys: format, version, seq_len, vocab_size, domains, tokenizer
{file, sha256, ...}, splits {name: {num_seqs, num_tokens, num_bytes, shards: [{file, num_seqs}], ...}}, plus
provenance (sources, config, stats). docs/architecture.md, "Token dataset on disk", has the layout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SmallTalkError
from ..io import atomic_write_bytes, atomic_write_json, read_json
from .shards import read_header
from .tokenizer import TOKENIZER_FILE

FORMAT, VERSION = "smalltalk-tokens", 1
MANIFEST = "manifest.json"


def is_prepared(directory: str | Path) -> bool:
    """Whether `directory` holds a finished token dataset (its manifest exists)."""
    return (Path(directory) / MANIFEST).is_file()


def load_manifest(data_dir: str | Path, check_shards: bool = False) -> dict:
    """Read ``<data_dir>/manifest.json`` and check it describes a complete smalltalk token dataset.

    With `check_shards`, every shard's header and size are checked too (cheap: no token is read).
    """
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise SmallTalkError(f"{data_dir}: no {MANIFEST}; run `smalltalk prepare --out {data_dir}` first")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SmallTalkError(f"{path}: not a smalltalk token-dataset manifest (format "
                             f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise SmallTalkError(f"{path}: manifest version {manifest.get('version')}, this smalltalk reads {VERSION}; "
                             "re-run `smalltalk prepare`")
    for key in ("seq_len", "vocab_size", "token_dtype", "tokenizer", "domains", "splits"):
        if key not in manifest:
            raise SmallTalkError(f"{path}: manifest lacks {key!r}; re-run `smalltalk prepare`")
    for split, info in manifest["splits"].items():
        for shard in info.get("shards", []):
            shard_path = data_dir / shard["file"]
            if not shard_path.is_file():
                raise SmallTalkError(f"{shard_path}: shard listed in the manifest is missing; re-run "
                                     "`smalltalk prepare`")
            if check_shards:
                header = read_header(shard_path)
                if header.num_seqs != shard["num_seqs"] or header.seq_len != manifest["seq_len"]:
                    raise SmallTalkError(f"{shard_path}: shard does not match the manifest; re-run "
                                         "`smalltalk prepare`")
    tok_file = data_dir / manifest["tokenizer"].get("file", TOKENIZER_FILE)
    if not tok_file.is_file():
        raise SmallTalkError(f"{tok_file}: tokenizer listed in the manifest is missing; re-run `smalltalk prepare`")
    if check_shards and hashlib.sha256(tok_file.read_bytes()).hexdigest() != manifest["tokenizer"].get("sha256"):
        raise SmallTalkError(f"{tok_file}: tokenizer differs from the one the manifest names; re-run "
                             "`smalltalk prepare`")
    return manifest



@dataclass(frozen=True)
class DataManifest:
    """A validated token-dataset manifest with its directory (the raw dict stays in `raw`)."""

    dir: Path
    seq_len: int
    vocab_size: int
    domains: list[str]
    splits: dict[str, dict]
    tokenizer: dict
    raw: dict

    @property
    def path(self) -> Path:
        return self.dir / MANIFEST

    @property
    def tokenizer_file(self) -> Path:
        return self.dir / self.tokenizer.get("file", TOKENIZER_FILE)

    @property
    def tokenizer_sha256(self) -> str | None:
        """The sha256 the manifest records for its tokenizer."""
        return self.tokenizer.get("sha256")

    def tokenizer_identity(self) -> str | None:
        """The identity models record for this dataset's tokenizer: the sha256 of its file's bytes (as model/io.py
        hashes it), or the recorded one when the file is gone."""
        from ..io import sha256_file

        return sha256_file(self.tokenizer_file) if self.tokenizer_file.is_file() else self.tokenizer_sha256

    def num_seqs(self, split: str) -> int:
        return int(self.splits.get(split, {}).get("num_seqs", 0))


def read_data_manifest(data_dir: str | Path, check_shards: bool = False) -> DataManifest:
    """`load_manifest` as a typed record."""
    raw = load_manifest(data_dir, check_shards)
    return DataManifest(Path(data_dir), int(raw["seq_len"]), int(raw["vocab_size"]), list(raw["domains"] or []),
                        dict(raw["splits"]), dict(raw["tokenizer"]), raw)


def subset_split(out_dir: Path, split: str, num_seqs: int, source: dict, seq_len: int,
                 domain_counts: dict[str, int]) -> dict:
    """The manifest entry of a split whose shards under ``<out_dir>/<split>/`` hold `num_seqs` of the source
    split's sequences (an expert's shard). Bytes are known only per source split, so they are apportioned by
    sequence count (approximate; for bits per byte)."""
    files = sorted((out_dir / split).glob("shard_*.bin"))
    src_seqs, src_bytes = int(source["num_seqs"]), source.get("num_bytes")
    return {"shards": [{"file": f"{split}/{p.name}", "num_seqs": read_header(p).num_seqs} for p in files],
            "num_seqs": int(num_seqs), "num_tokens": int(num_seqs) * seq_len, "num_documents": None,
            "num_bytes": int(round(src_bytes * num_seqs / max(1, src_seqs))) if src_bytes else None,
            "domain_counts": domain_counts}


def write_subset_manifest(out_dir: Path, source: DataManifest, splits: dict[str, dict], expert: int,
                          config: dict[str, Any]) -> None:
    """The manifest (and tokenizer copy) of a token dataset cut from `source` (one expert's shard), so that every
    reader of token data (`load_split`, `TokenDataset`) reads it like any prepared dataset."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.tokenizer_file.is_file():
        atomic_write_bytes(out_dir / source.tokenizer_file.name, source.tokenizer_file.read_bytes())
    atomic_write_json(out_dir / MANIFEST, {
        "format": FORMAT, "version": VERSION, "seq_len": source.seq_len, "vocab_size": source.vocab_size,
        "token_dtype": source.raw.get("token_dtype"), "tokenizer": dict(source.tokenizer),
        "domains": list(source.domains), "splits": splits,
        "sources": [{"sharded_from": str(source.dir.resolve()), "expert": expert}], "config": config, "stats": {},
    })
