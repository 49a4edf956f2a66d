"""Helper of the tests that need a little real text: the first documents of a few sample-corpus domains."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def documents(corpus_dir: Path, split: str, domains: tuple[str, ...], per_domain: int,
              min_chars: int = 0) -> list[str]:
    """The first `per_domain` texts of at least `min_chars` characters of each domain, domain by domain."""
    texts = []
    for domain in domains:
        with gzip.open(corpus_dir / split / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            found = (text for text in (json.loads(line)["text"] for line in f) if len(text) >= min_chars)
            texts.extend(text for _, text in zip(range(per_domain), found))
    return texts
