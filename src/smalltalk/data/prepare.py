"""`smalltalk prepare`: corpus -> tokenizer -> packed token shards + manifest.

Steps (layout and manifest keys in docs/architecture.md, "Token dataset on disk"):

1. Plan the sources. A corpus directory with ``train/`` and ``valid/`` or ``test/`` sub-directories
   (the sample corpus) keeps its splits; so does an ``hf:`` dataset with such splits. Anything else
   is split by a hash of each document's text (`valid_fraction`, `test_fraction`; `seed` salts it).
2. Train a byte-level BPE tokenizer on the first ``tokenizer_sample_bytes`` of training text, taken
   evenly across training files (or load ``tokenizer_file``).
3. One streaming pass over all sources: documents are batched, encoded in worker processes (each
   document followed by EOS), packed into ``seq_len`` sequences per split and written as shards.
   Memory is bounded by ``num_workers * 2`` batches in flight plus one shard being filled.
4. Write ``manifest.json`` last, atomically: a data directory without it is not a dataset.

Re-running with the same config, sources (path, size, mtime) and tokenizer returns the existing
manifest without work. An interrupted run keeps its trained tokenizer and rewrites the shards;
shards are written atomically so none looks complete when it is not. On bad input a
`SmallTalkError` is raised and what this run wrote is removed. Re-preparing a finished dataset with
other settings builds the new one in ``.<out>.prepare-staging`` beside it (reusing its tokenizer when
the tokenizer settings are unchanged) and swaps it in only when complete, so the old dataset survives
bad input and interruptions.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..version import __version__
from ..errors import SmallTalkError
from ..io import atomic_write_bytes, atomic_write_json, read_json, remove_stale_temps
from .encode import DocumentEncoder, document_pieces
from .manifest import FORMAT, MANIFEST, VERSION, load_manifest
from .packing import SequencePacker
from .prepare_config import NOT_IDENTITY, NOT_TOKENIZER_IDENTITY, PrepareConfig
from .readers import Document, ReadStats
from .shards import UNKNOWN_DOMAIN, ShardWriter, token_dtype, write_shard
from .tokenizer import TOKENIZER_FILE
from .sources import HASH_SPLIT, SPLITS, PlannedSource, iter_split_documents, plan_sources, source_fingerprint
from .tokenizer import TextTokenizer, load_tokenizer, train_tokenizer

STATE = ".prepare_state.json"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- per-split output


class _SplitSink:
    """Packs one split's encoded documents into sequences and shards, counting what went in."""

    def __init__(self, root: Path, split: str, seq_len: int, vocab_size: int, seqs_per_shard: int, dtype):
        self.root, self.split = root, split
        self.packer = SequencePacker(seq_len, dtype)
        self.writer = ShardWriter(root / split, seq_len, vocab_size, seqs_per_shard)
        self.num_documents = 0
        self.text_bytes = 0
        self.domain_counts: collections.Counter = collections.Counter()

    def add(self, tokens: np.ndarray, lengths: np.ndarray, domains: np.ndarray, text_bytes: int,
            num_documents: int) -> None:
        seqs, seq_domains = self.packer.add(tokens, lengths, domains)
        self.num_documents += num_documents
        self.text_bytes += text_bytes
        if len(seqs):
            self.writer.add(seqs, seq_domains)
            ids, counts = np.unique(seq_domains, return_counts=True)
            self.domain_counts.update(dict(zip(ids.tolist(), counts.tolist())))

    def close(self, domains: list[str]) -> dict:
        written = self.writer.close()
        if not written:  # keep the split directory well-formed: one empty shard
            path = self.root / self.split / "shard_00000.bin"
            write_shard(path, np.zeros((0, self.packer.seq_len), self.packer.dtype), None, self.writer.vocab_size)
            written = [{"file": path.name, "num_seqs": 0}]
        num_seqs = sum(s["num_seqs"] for s in written)
        tokens_in, tokens_out = self.packer.tokens_in, self.packer.tokens_out
        counts = {(domains[d] if d != UNKNOWN_DOMAIN else "<unknown>"): int(c)
                  for d, c in sorted(self.domain_counts.items())}
        return {
            "shards": [{"file": f"{self.split}/{s['file']}", "num_seqs": int(s["num_seqs"])} for s in written],
            "num_seqs": int(num_seqs),
            "num_tokens": int(num_seqs * self.packer.seq_len),
            "num_documents": int(self.num_documents),
            # UTF-8 bytes of the text in complete sequences (the dropped tail is pro-rated), for bits per byte.
            "num_bytes": int(round(self.text_bytes * tokens_out / tokens_in)) if tokens_in else 0,
            "num_text_bytes": int(self.text_bytes),
            "num_tokens_before_packing": int(tokens_in),
            "domain_counts": counts,
        }


# ----------------------------------------------------------------------------- the stage


def prepare(cfg: PrepareConfig, log: Callable[[str], None] | None = None) -> dict:
    """Build the token dataset described by `cfg`; returns its manifest (see module docstring)."""
    log = log or (lambda msg: None)
    out = cfg.resolved_out_dir()
    planned = plan_sources(cfg.resolved_corpus())
    given = load_tokenizer(cfg.tokenizer_file) if cfg.tokenizer_file else None
    identity = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IDENTITY}
    if given is not None:
        identity.pop("vocab_size")
        identity["tokenizer_sha256"] = given.sha256
    identity["sources"] = source_fingerprint(planned)
    fingerprint = _digest(identity)
    tokenizer_fingerprint = _digest({k: v for k, v in identity.items() if k not in NOT_TOKENIZER_IDENTITY})

    existing = _up_to_date(out, fingerprint)
    if existing is not None:
        log(f"{out}: up to date (same config, sources and tokenizer); nothing to do")
        return existing
    # A finished dataset stays usable until its replacement is complete: rebuilds go to a staging
    # directory beside it that is swapped in at the end (bad input or Ctrl-C then loses nothing).
    _recover_swap(out)
    replacing = (out / MANIFEST).is_file()
    work = _staging_dir(out) if replacing else out
    created = not work.exists()
    _claim_out_dir(work)
    try:
        tokenizer, trained = _get_tokenizer(cfg, work, planned, given, tokenizer_fingerprint, log,
                                            reuse_from=out if replacing else None)
        manifest = _encode_all(cfg, work, planned, tokenizer, log)
    except SmallTalkError:
        _remove_partial(work, created)
        raise
    manifest.update(
        tokenizer={"file": TOKENIZER_FILE, "sha256": tokenizer.sha256, "bos_id": tokenizer.bos_id,
                   "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "trained": trained},
        sources=identity["sources"], fingerprint=fingerprint,
        config=cfg.replace(corpus=cfg.resolved_corpus(), out_dir=str(out)).to_dict(),
        producer={"name": "smalltalk", "version": __version__},
    )
    atomic_write_json(work / MANIFEST, manifest)
    if replacing:
        _swap_in(work, out)
    return manifest


def _staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.prepare-staging"


def _old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.prepare-old"


def _swap_in(staging: Path, out: Path) -> None:
    """Replace the dataset `out` by the finished `staging` one: two renames, then drop the old one."""
    old = _old_dir(out)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _recover_swap(out: Path) -> None:
    """Finish a swap that was interrupted between its two renames; drop an old dataset left behind."""
    staging = _staging_dir(out)
    if not out.exists() and (staging / MANIFEST).is_file():
        os.rename(staging, out)
    shutil.rmtree(_old_dir(out), ignore_errors=True)


def _up_to_date(out: Path, fingerprint: str) -> dict | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = load_manifest(out, check_shards=True)
    except SmallTalkError:
        return None
    return manifest if manifest.get("fingerprint") == fingerprint else None


def _claim_out_dir(out: Path) -> None:
    """Refuse to write into a directory that is not ours; drop the stale manifest and temp files."""
    if out.exists() and not out.is_dir():
        raise SmallTalkError(f"{out}: output path exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        ours = {MANIFEST, STATE, TOKENIZER_FILE} | set(SPLITS)
        if not any((out / name).exists() for name in (MANIFEST, STATE)):
            raise SmallTalkError(f"{out}: directory is not empty and is not a smalltalk data directory; "
                                 "choose another --out")
        strangers = [p.name for p in out.iterdir() if p.name not in ours and not p.name.endswith(".tmp")]
        if strangers:
            raise SmallTalkError(f"{out}: holds files prepare did not write ({', '.join(sorted(strangers)[:3])}); "
                                 "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from now on the directory is not a dataset until we finish
    remove_stale_temps(out)


def _remove_partial(out: Path, created: bool) -> None:
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)


def _get_tokenizer(cfg: PrepareConfig, out: Path, planned: list[PlannedSource], given: TextTokenizer | None,
                   tokenizer_fingerprint: str, log: Callable[[str], None],
                   reuse_from: Path | None = None) -> tuple[TextTokenizer, bool]:
    """The given tokenizer (copied into `out`), the one an interrupted run (or the dataset `reuse_from`
    that `out` will replace) trained with the same settings, or a new one."""
    target = out / TOKENIZER_FILE
    if given is not None:
        atomic_write_bytes(target, Path(given.path).read_bytes())
        atomic_write_json(out / STATE, {"tokenizer_fingerprint": tokenizer_fingerprint, "tokenizer_sha256": given.sha256})
        return load_tokenizer(target), False
    for where in (out, reuse_from):
        if where is None:
            continue
        state = read_json(where / STATE) if (where / STATE).is_file() else {}
        if state.get("tokenizer_fingerprint") == tokenizer_fingerprint and (where / TOKENIZER_FILE).is_file():
            tokenizer = load_tokenizer(where / TOKENIZER_FILE)
            if tokenizer.sha256 == state.get("tokenizer_sha256"):
                if where != out:
                    atomic_write_bytes(target, (where / TOKENIZER_FILE).read_bytes())
                    atomic_write_json(out / STATE, state)
                    tokenizer = load_tokenizer(target)
                log(f"{where / TOKENIZER_FILE}: reusing the tokenizer trained by a previous run")
                return tokenizer, True
    train_files = [p for p in planned if p.split in ("train", HASH_SPLIT)]
    per_file = max(1, cfg.tokenizer_sample_bytes // max(1, len(train_files)))
    if cfg.max_bytes_per_file is not None:
        per_file = min(per_file, cfg.max_bytes_per_file)
    sample_stats = ReadStats()
    texts = [doc.text for _, doc in iter_split_documents(train_files, cfg, sample_stats, per_file, only_split="train")]
    if not texts:
        raise SmallTalkError(f"{', '.join(cfg.resolved_corpus())}: no training text to learn a tokenizer from")
    log(f"training a {cfg.vocab_size}-token byte-level BPE tokenizer on {sum(map(len, texts)) / 1e6:.1f} MB "
        f"({len(texts)} documents from {len(train_files)} files)")
    tokenizer = train_tokenizer(texts, cfg.vocab_size, target)
    if tokenizer.vocab_size < cfg.vocab_size:
        log(f"warning: asked for a {cfg.vocab_size}-token vocabulary, but the training text only supports "
            f"{tokenizer.vocab_size} tokens (BPE ran out of pairs to merge); the data and models use "
            f"{tokenizer.vocab_size}. Give more text (--tokenizer-sample-bytes) or a smaller --vocab-size")
    atomic_write_json(out / STATE, {"tokenizer_fingerprint": tokenizer_fingerprint, "tokenizer_sha256": tokenizer.sha256})
    return tokenizer, True


def _encode_all(cfg: PrepareConfig, out: Path, planned: list[PlannedSource], tokenizer: TextTokenizer,
                log: Callable[[str], None]) -> dict:
    """One streaming pass: read -> batch per split -> encode in workers -> pack -> shards."""
    from ..progress import progress

    dtype = token_dtype(tokenizer.vocab_size)
    for split in SPLITS:  # shards of an older run must not mix with ours
        shutil.rmtree(out / split, ignore_errors=True)
    sinks = {s: _SplitSink(out, s, cfg.seq_len, tokenizer.vocab_size, cfg.seqs_per_shard, dtype) for s in SPLITS}
    domains: list[str] = []
    domain_ids: dict[str, int] = {}
    stats = ReadStats()
    num_workers = cfg.num_workers or os.cpu_count() or 1
    log(f"tokenizing and packing into {out} ({num_workers} worker{'s' * (num_workers > 1)}, seq_len {cfg.seq_len})")
    encoder = DocumentEncoder(tokenizer, dtype, num_workers)
    in_flight: collections.deque = collections.deque()
    pending = {s: ([], [], [], 0) for s in SPLITS}  # split -> (texts, domain ids, ends-a-document flags, chars)
    bar = progress(desc=f"prepare {cfg.name}", unit="B", unit_scale=True, enabled=cfg.progress)

    def drain(limit: int) -> None:
        while len(in_flight) > limit:
            split, doc_domains, num_docs, handle = in_flight.popleft()
            tokens, lengths, text_bytes = handle.get()
            sinks[split].add(tokens, lengths, doc_domains, text_bytes, num_docs)
            bar.update(text_bytes)

    def submit(split: str) -> None:
        texts, doc_domains, ends, _ = pending[split]
        if texts:
            in_flight.append((split, np.asarray(doc_domains, np.int16), sum(ends), encoder.submit(texts, ends)))
            pending[split] = ([], [], [], 0)
            drain(2 * num_workers)

    ok = False
    try:
        budget = cfg.max_bytes_per_file
        for split, doc in iter_split_documents(planned, cfg, stats, budget):
            domain = _domain_id(doc, cfg.domain_field, domains, domain_ids)
            for piece, last in document_pieces(doc.text, cfg.max_doc_chars):
                texts, doc_domains, ends, size = pending[split]
                texts.append(piece)
                doc_domains.append(domain)
                ends.append(last)
                size += len(piece)
                pending[split] = (texts, doc_domains, ends, size)
                if size >= cfg.batch_bytes:
                    submit(split)
        for split in SPLITS:
            submit(split)
        drain(0)
        ok = True
    finally:
        encoder.close(ok)
        bar.close()
    splits = {s: sinks[s].close(domains) for s in SPLITS}
    if splits["train"]["num_seqs"] == 0:
        raise SmallTalkError(f"{', '.join(cfg.resolved_corpus())}: the train split has "
                             f"{splits['train']['num_tokens_before_packing']} tokens, fewer than one sequence of "
                             f"seq_len={cfg.seq_len}; use more text or a smaller --seq-len")
    for s in SPLITS:
        if splits[s]["num_seqs"] == 0:
            log(f"warning: split {s!r} has no complete sequence of {cfg.seq_len} tokens")
    log("; ".join(f"{s}: {v['num_seqs']} seqs, {v['num_documents']} docs" for s, v in splits.items()))
    if stats.capped:
        log(f"note: read only the first {cfg.max_bytes_per_file:,} bytes of text of {stats.capped} corpus file(s) "
            f"(max_bytes_per_file of the {cfg.name!r} settings); --max-bytes-per-file N changes the cap")
    return {
        "format": FORMAT, "version": VERSION, "seq_len": cfg.seq_len, "vocab_size": tokenizer.vocab_size,
        "token_dtype": dtype.name, "domains": domains, "splits": splits,
        "stats": {k: v for k, v in stats.as_dict().items()},
    }


def _domain_id(doc: Document, field_name: str | None, domains: list[str], ids: dict[str, int]) -> int:
    if field_name is None or field_name not in doc.meta:
        return UNKNOWN_DOMAIN
    name = str(doc.meta[field_name])
    if name not in ids:
        if len(domains) >= np.iinfo(np.int16).max:
            raise SmallTalkError(f"{doc.source}: more than {np.iinfo(np.int16).max} distinct {field_name!r} values; "
                                 "a domain label must be a category (drop it with --domain-field '')")
        ids[name] = len(domains)
        domains.append(name)
    return ids[name]


