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
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import __version__
from ..config_dict import DictConfig, check_field_types
from ..errors import SmallTalkError
from ..io import atomic_write_bytes, atomic_write_json, read_json, remove_stale_temps
from ..paths import default_corpus_dir
from .packing import SequencePacker
from .readers import (Document, ReadStats, hf_split_names, is_hf_source, iter_documents, parse_hf_source,
                      resolve_sources)
from .shards import UNKNOWN_DOMAIN, ShardWriter, read_header, token_dtype, write_shard
from .tokenizer import TOKENIZER_PRESETS, TextTokenizer, check_vocab_size, load_tokenizer, train_tokenizer

FORMAT, VERSION = "smalltalk-tokens", 1
SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid",
                  "dev": "valid", "test": "test", "testing": "test"}
MANIFEST, STATE, TOKENIZER_FILE = "manifest.json", ".prepare_state.json", "tokenizer.json"
HASH_SPLIT = "hash"
# Fields that do not change the output: left out of the fingerprint that decides "already done".
_NOT_IDENTITY = ("corpus", "out_dir", "tokenizer_file", "num_workers", "batch_bytes", "progress", "name")
# ... and fields that change the shards but not the tokenizer.
_NOT_TOKENIZER_IDENTITY = ("seq_len", "seqs_per_shard")


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


# ----------------------------------------------------------------------------- sources and splits


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


def _source_fingerprint(planned: list[PlannedSource]) -> list[dict]:
    out = []
    for p in planned:
        entry = {"path": p.source, "split": p.split}
        if not is_hf_source(p.source):
            st = Path(p.source).stat()
            entry.update(path=str(Path(p.source).resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)
        out.append(entry)
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


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


# ----------------------------------------------------------------------------- encoding workers

_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer_json: str, dtype: str, in_pool: bool = True) -> None:
    from tokenizers import Tokenizer

    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    raw = tokenizer_json.encode("utf-8")
    _WORKER["tokenizer"] = TextTokenizer(Tokenizer.from_str(tokenizer_json), raw)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_batch(texts: list[str], ends: list[bool]) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens with an EOS after each document's last piece, per-piece lengths incl. EOS, UTF-8 bytes)."""
    tokens, lengths = _WORKER["tokenizer"].encode_documents(texts, dtype=_WORKER["dtype"], ends=ends)
    return tokens, lengths, sum(len(t.encode("utf-8")) for t in texts)


_RUN_START = re.compile(r"\S(?=\s)")  # the last character before a whitespace run


def document_pieces(text: str, max_chars: int) -> Iterator[tuple[str, bool]]:
    """(piece, is_last) of a document, each at most `max_chars` long. A piece ends where a whitespace run
    starts in the last tenth of the window: byte-level BPE never joins a character with the whitespace
    after it, so the pieces' tokens are the whole document's (a window with no whitespace at all is cut
    where it ends, which may split one word's tokens)."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        floor = max(start + 1, end - max(1, max_chars // 10))
        last = None
        for last in _RUN_START.finditer(text, floor - 1, end):
            pass
        end = last.end() if last is not None else end
        yield text[start:end], False
        start = end
    yield text[start:], True


class _Done:
    """An already computed result with the `AsyncResult.get` interface (in-process encoding)."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Encoder:
    """Runs `_encode_batch` in a process pool (or in-process when num_workers <= 1), results in order."""

    def __init__(self, tokenizer: TextTokenizer, dtype: np.dtype, num_workers: int):
        self.pool = None
        args = (tokenizer.to_json(), dtype.str)
        if num_workers <= 1:
            _worker_init(*args, in_pool=False)  # the library still encodes a batch on its own threads
            return
        # fork starts workers in milliseconds and needs no `if __name__ == "__main__"` guard in user scripts;
        # elsewhere (macOS, Windows) fork is unsafe or absent.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        # Set before forking so the children do not warn that the parent used parallelism.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            self.pool = mp.get_context(method).Pool(num_workers, initializer=_worker_init, initargs=args)
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous

    def submit(self, texts: list[str], ends: list[bool]):
        if self.pool is None:
            return _Done(_encode_batch(texts, ends))
        return self.pool.apply_async(_encode_batch, (texts, ends))

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None


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
    identity = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IDENTITY}
    if given is not None:
        identity.pop("vocab_size")
        identity["tokenizer_sha256"] = given.sha256
    identity["sources"] = _source_fingerprint(planned)
    fingerprint = _digest(identity)
    tokenizer_fingerprint = _digest({k: v for k, v in identity.items() if k not in _NOT_TOKENIZER_IDENTITY})

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
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    for split in SPLITS:  # shards of an older run must not mix with ours
        shutil.rmtree(out / split, ignore_errors=True)
    sinks = {s: _SplitSink(out, s, cfg.seq_len, tokenizer.vocab_size, cfg.seqs_per_shard, dtype) for s in SPLITS}
    domains: list[str] = []
    domain_ids: dict[str, int] = {}
    stats = ReadStats()
    num_workers = cfg.num_workers or os.cpu_count() or 1
    log(f"tokenizing and packing into {out} ({num_workers} worker{'s' * (num_workers > 1)}, seq_len {cfg.seq_len})")
    encoder = _Encoder(tokenizer, dtype, num_workers)
    in_flight: collections.deque = collections.deque()
    pending = {s: ([], [], [], 0) for s in SPLITS}  # split -> (texts, domain ids, ends-a-document flags, chars)
    bar = tqdm(desc=f"prepare {cfg.name}", unit="B", unit_scale=True, disable=not cfg.progress, leave=False)

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


# ----------------------------------------------------------------------------- reading it back


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
