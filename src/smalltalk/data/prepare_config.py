"""`PrepareConfig`: what `smalltalk prepare` reads and how (sources, tokenizer, packing, splits), and its presets."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config_dict import DictConfig, check_field_types
from ..errors import SmallTalkError
from ..paths import default_corpus_dir
from .tokenizer import TOKENIZER_PRESETS, check_vocab_size

# Fields that do not change the output: left out of the fingerprint that decides "already done".
NOT_IDENTITY = ("corpus", "out_dir", "tokenizer_file", "num_workers", "batch_bytes", "progress", "name")
# ... and fields that change the shards but not the tokenizer.
NOT_TOKENIZER_IDENTITY = ("seq_len", "seqs_per_shard")



@dataclass
class PrepareConfig(DictConfig):
    config_kind = "prepare config"

    corpus: tuple[str, ...] = ()
    """Corpus sources: directories, files, globs or ``hf:<name>[:<config>][:<split>]``; empty = the sample corpus
    (``$SMALLTALK_CORPUS``, else ``../shared/corpus``)."""
    out_dir: str = ""
    """Output data directory; empty = ``runs/data-<name>``."""
    tokenizer_file: str | None = None
    """Existing ``tokenizer.json`` to use instead of training one (vocab_size is then the file's)."""
    vocab_size: int = TOKENIZER_PRESETS["cpu"]
    """Vocabulary of the trained tokenizer, special tokens included."""
    seq_len: int = 256
    """Tokens per packed sequence S (the model's context length)."""
    tokenizer_sample_bytes: int = 20_000_000
    """UTF-8 bytes of training text the tokenizer learns from, taken evenly across training files."""
    text_field: str = "text"
    """JSONL key / Parquet column / HF feature holding the text."""
    meta_fields: tuple[str, ...] = ("domain",)
    """Metadata carried along; the first one (if any) labels each sequence's domain."""
    max_bytes_per_file: int | None = None
    """Read only the first N bytes of text of each source file per split (small, fast runs); None = all."""
    max_doc_chars: int = 1_000_000
    """Longer documents are tokenized in pieces of at most this many characters, cut where a whitespace run
    starts and joined without EOS (the same tokens as the whole document), so the tokenizer's memory is
    bounded by this setting, not by the longest document."""
    seqs_per_shard: int = 65536
    """Sequences per shard file."""
    valid_fraction: float = 0.01
    """Share of documents for `valid` when the corpus has no splits (by document hash)."""
    test_fraction: float = 0.01
    """Share of documents for `test` when the corpus has no splits (by document hash)."""
    num_workers: int = 0
    """Tokenizer processes; 0 = one per CPU core. 1 = in-process (the library still uses its own threads)."""
    batch_bytes: int = 1 << 20
    """Text per encoding task sent to a worker."""
    skip_bad: bool = False
    """Skip bad records and unreadable files (counted in the manifest's stats) instead of failing."""
    seed: int = 0
    """Salts the document-hash split (only used when the corpus has no splits)."""
    progress: bool = True
    """Show a progress bar (stderr)."""
    name: str = field(default="custom", compare=False)
    """Preset name this config came from (informational)."""

    def __post_init__(self) -> None:
        check_field_types(self, self.config_kind)
        if isinstance(self.corpus, (str, os.PathLike)):
            self.corpus = (self.corpus,)
        self.corpus = tuple(str(c) for c in self.corpus)
        if isinstance(self.meta_fields, str):
            self.meta_fields = (self.meta_fields,)
        self.meta_fields = tuple(self.meta_fields)
        self.out_dir = str(self.out_dir) if self.out_dir else ""
        self.tokenizer_file = str(self.tokenizer_file) if self.tokenizer_file else None
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or not 2 <= self.seq_len <= 1 << 20:
            raise SmallTalkError(f"seq_len={self.seq_len!r} makes no sense: use an integer in [2, {1 << 20}] "
                                 "(the paper uses 1024)")
        if self.tokenizer_file is None:
            check_vocab_size(self.vocab_size)
        for key in ("tokenizer_sample_bytes", "seqs_per_shard", "batch_bytes", "max_doc_chars"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SmallTalkError(f"prepare config: {key}={value!r} must be a positive integer")
        if self.max_bytes_per_file is not None and (not isinstance(self.max_bytes_per_file, int)
                                                    or self.max_bytes_per_file <= 0):
            raise SmallTalkError(f"prepare config: max_bytes_per_file={self.max_bytes_per_file!r} must be a "
                                 "positive integer or None")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise SmallTalkError(f"prepare config: num_workers={self.num_workers!r} must be >= 0 (0 = all cores)")
        for key in ("valid_fraction", "test_fraction"):
            if not 0 <= getattr(self, key) < 0.5:
                raise SmallTalkError(f"prepare config: {key}={getattr(self, key)!r} must be in [0, 0.5)")
        if not self.text_field:
            raise SmallTalkError("prepare config: text_field must not be empty")

    @property
    def domain_field(self) -> str | None:
        return self.meta_fields[0] if self.meta_fields else None

    def resolved_corpus(self) -> tuple[str, ...]:
        return self.corpus or (str(default_corpus_dir()),)

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir or f"runs/data-{self.name}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["corpus"], d["meta_fields"] = list(self.corpus), list(self.meta_fields)
        return d


PREPARE_PRESETS: dict[str, PrepareConfig] = {
    # Tests and the quickstart: the first 192 KB of each corpus file per split (5 MB of text, 1.9M tokens), ~5 s
    # on 2 idle cores.
    "tiny": PrepareConfig(vocab_size=TOKENIZER_PRESETS["tiny"], seq_len=128, tokenizer_sample_bytes=1_000_000,
                          max_bytes_per_file=192_000, seqs_per_shard=8192, name="tiny"),
    # The full sample corpus at CPU scale.
    "cpu": PrepareConfig(vocab_size=TOKENIZER_PRESETS["cpu"], seq_len=256, tokenizer_sample_bytes=20_000_000,
                         seqs_per_shard=65536, name="cpu"),
    # The paper's S=1024 and 32k vocabulary.
    "paper": PrepareConfig(vocab_size=TOKENIZER_PRESETS["paper"], seq_len=1024, tokenizer_sample_bytes=200_000_000,
                           seqs_per_shard=32768, name="paper"),
}


def preset(name: str, **overrides) -> PrepareConfig:
    """A copy of the named preset with `overrides` applied."""
    if name not in PREPARE_PRESETS:
        raise SmallTalkError(f"unknown prepare preset {name!r}; choose one of {', '.join(PREPARE_PRESETS)}")
    return PREPARE_PRESETS[name].replace(**overrides)


