"""Planning a corpus into sources bound to splits, and reading its documents split by split.

A corpus directory with ``train/`` and ``valid/`` or ``test/`` sub-directories keeps its splits; so does an
``hf:`` dataset with such splits. Anything else is split by a keyed hash of each document's text.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import SmallTalkError
from .prepare_config import PrepareConfig
from .readers import (Document, ReadStats, hf_split_names, is_hf_source, iter_documents, parse_hf_source,
                      resolve_sources)

SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid",
                  "dev": "valid", "test": "test", "testing": "test"}
HASH_SPLIT = "hash"


@dataclass(frozen=True)
class PlannedSource:
    source: str
    """A file path or an ``hf:`` spec."""
    split: str
    """train / valid / test, or "hash" for a document-hash split."""


def _split_subdirs(path: Path) -> dict[str, Path]:
    out = {}
    for child in sorted(path.iterdir()):
        split = _SPLIT_ALIASES.get(child.name.lower())
        if child.is_dir() and split and split not in out:
            out[split] = child
    return out


def plan_sources(corpus: Sequence[str]) -> list[PlannedSource]:
    """Resolve the corpus into files (or hf specs), each bound to a split or to the hash split."""
    planned: list[PlannedSource] = []
    for entry in corpus:
        if is_hf_source(entry):
            name, config, split = parse_hf_source(entry)
            names = hf_split_names(entry)
            prefix = f"hf:{name}:{config}" if config else f"hf:{name}"
            for n in names:
                if split is not None or _SPLIT_ALIASES.get(n.lower()):
                    planned.append(PlannedSource(f"{prefix}:{n}", _SPLIT_ALIASES.get(n.lower(), HASH_SPLIT)))
            continue
        path = Path(entry)
        subdirs = _split_subdirs(path) if path.is_dir() else {}
        if "train" in subdirs and len(subdirs) > 1:
            for split in SPLITS:
                if split in subdirs and any(True for _ in _files_or_empty(subdirs[split])):
                    planned += [PlannedSource(f, split) for f in resolve_sources(subdirs[split])]
        else:
            planned += [PlannedSource(f, HASH_SPLIT) for f in resolve_sources(entry)]
    # Keep the source's splits only when it has held-out ones; a lone train split is split by hash.
    if not any(p.split in ("valid", "test") for p in planned):
        planned = [PlannedSource(p.source, HASH_SPLIT) for p in planned]
    order = {s: i for i, s in enumerate(SPLITS + (HASH_SPLIT,))}
    planned = sorted(dict.fromkeys(planned), key=lambda p: order[p.split])  # stable: keeps file order per split
    return planned


def _files_or_empty(directory: Path) -> Iterator[Path]:
    try:
        yield from resolve_sources(directory)
    except SmallTalkError:
        return


def source_fingerprint(planned: list[PlannedSource]) -> list[dict]:
    out = []
    for p in planned:
        entry = {"path": p.source, "split": p.split}
        if not is_hf_source(p.source):
            st = Path(p.source).stat()
            entry.update(path=str(Path(p.source).resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)
        out.append(entry)
    return out


def _hash_split(text: str, cfg: PrepareConfig) -> str:
    key = int(cfg.seed).to_bytes(8, "little", signed=True)
    u = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest(), "little") / 2**64
    if u < cfg.test_fraction:
        return "test"
    return "valid" if u < cfg.test_fraction + cfg.valid_fraction else "train"


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def iter_split_documents(planned: list[PlannedSource], cfg: PrepareConfig, stats: ReadStats,
                         budget_per_file: int | None = None,
                         only_split: str | None = None) -> Iterator[tuple[str, Document]]:
    """Yield (split, document) over all planned sources in order.

    `budget_per_file` caps the UTF-8 bytes taken from each file per split (the last document is
    cut); for a hash-split file reading stops once its train share is full.
    """
    for p in planned:
        if only_split is not None and p.split not in (only_split, HASH_SPLIT):
            continue
        used = collections.Counter()
        capped: set[str] = set()
        for doc in iter_documents(p.source, cfg.text_field, cfg.meta_fields, cfg.skip_bad, stats):
            split = p.split if p.split != HASH_SPLIT else _hash_split(doc.text, cfg)
            if only_split is not None and split != only_split:
                continue
            if budget_per_file is not None:
                room = budget_per_file - used[split]
                if room <= 0:
                    if split not in capped:
                        capped.add(split)
                        stats.capped += 1
                    if p.split != HASH_SPLIT or split == "train":
                        break
                    continue
                nbytes = len(doc.text.encode("utf-8"))
                if nbytes > room:
                    if split not in capped:
                        capped.add(split)
                        stats.capped += 1
                    doc = dataclasses.replace(doc, text=_truncate_utf8(doc.text, room))
                used[split] += min(nbytes, room)
            yield split, doc


