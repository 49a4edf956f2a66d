"""Corpus readers: stream documents from text, JSON-lines, Parquet files or Hugging Face datasets.

``iter_documents(sources)`` yields `Document` records one at a time, so a corpus of any size is
read in bounded memory. A source is

- a file: ``.txt`` / ``.md`` (the whole file is one document), ``.jsonl`` / ``.jsonl.gz`` /
  ``.jsonl.zst`` (one JSON object per line), ``.parquet`` (one row per document);
- a directory (every supported file below it, recursively, in sorted order);
- a glob (``corpus/**/*.jsonl.gz``);
- ``hf:<name>[:<config>][:<split>]``: a Hugging Face dataset, streamed (needs the ``[hf]`` extra).
  ``<name>`` may be a Hub id or a local directory of data files (what the tests use: the Hub is
  unreachable here);
- or a list of any of these.

Bad input raises `SmallTalkError` naming the file and line (1-based; the row number for Parquet
and HF). With ``skip_bad=True`` bad records (and unreadable files) are skipped and counted in
`ReadStats` instead. Invalid UTF-8 is never fatal: it is decoded with U+FFFD replacement
characters and counted (``stats.invalid_utf8``), since one stray byte should not stop a job.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

from ..errors import SmallTalkError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
HF_PREFIX = "hf:"
_BINARY_PROBE = 8192  # bytes looked at to tell a binary file from text
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Document:
    text: str
    meta: dict = field(default_factory=dict)
    """The requested metadata fields present in the record (e.g. ``{"domain": "books_en"}``)."""
    source: str = ""
    """File path (or ``hf:`` spec) the document came from."""
    line: int | None = None
    """1-based line (JSONL) or row (Parquet, HF) number; None for whole-file documents."""


@dataclass
class ReadStats:
    """Counters updated while reading; pass one to `iter_documents` to collect them."""

    files: int = 0
    documents: int = 0
    invalid_utf8: int = 0
    """Documents that contained invalid UTF-8 (or lone surrogates) and were decoded with replacement."""
    skipped: int = 0
    """Bad records skipped because of ``skip_bad``."""
    skipped_files: int = 0
    """Unreadable / empty files skipped because of ``skip_bad``."""
    empty: int = 0
    """Records whose text was empty (ignored: they carry no tokens)."""
    capped: int = 0
    """Files (per split) whose text was cut at `max_bytes_per_file` (prepare)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def is_hf_source(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(HF_PREFIX)


def file_kind(path: str | Path) -> str | None:
    """'text', 'jsonl' or 'parquet' for a supported file name, else None."""
    name = str(path).lower()
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("text", TEXT_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _supported_files_under(directory: Path) -> list[Path]:
    files = [p for p in directory.rglob("*")
             if p.is_file() and file_kind(p) and not any(part.startswith(".") for part in p.relative_to(directory).parts)]
    return sorted(files)


def resolve_sources(sources: str | Path | Sequence[str | Path]) -> list[str]:
    """Expand directories and globs into a sorted, de-duplicated list of files (and ``hf:`` specs).

    Raises `SmallTalkError` for a missing path, a directory without supported files, a glob that
    matches nothing, or a file of an unsupported type.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise SmallTalkError("no corpus given; pass --corpus PATH (a directory, file, glob or hf:<name>)")
    out: list[str] = []
    for source in sources:
        if is_hf_source(source):
            out.append(str(source))
            continue
        text = str(source)
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(m) for m in globlib.glob(text, recursive=True))
            files = [m for m in matches if m.is_file() and file_kind(m)]
            if not files:
                raise SmallTalkError(f"{text}: glob matches no {'/'.join(SUPPORTED_SUFFIXES)} files; check the pattern")
        else:
            path = Path(text)
            if not path.exists():
                raise SmallTalkError(f"{path}: corpus path not found; pass an existing file or directory "
                                     "(or set SMALLTALK_CORPUS)")
            if path.is_dir():
                files = _supported_files_under(path)
                if not files:
                    raise SmallTalkError(f"{path}: empty directory: no {'/'.join(SUPPORTED_SUFFIXES)} files in it")
            elif file_kind(path) is None:
                raise SmallTalkError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
            else:
                files = [path]
        out.extend(str(f) for f in files)
    return list(dict.fromkeys(out))  # de-duplicate, keep order


def iter_documents(
    sources: str | Path | Sequence[str | Path],
    text_field: str = "text",
    meta_fields: Iterable[str] = ("domain",),
    skip_bad: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Yield the documents of `sources` in order (see the module docstring for what a source is)."""
    stats = stats if stats is not None else ReadStats()
    meta_fields = tuple(meta_fields)
    for source in resolve_sources(sources):
        reader = _iter_hf if is_hf_source(source) else _READERS[file_kind(source)]
        produced = stats.documents
        try:
            stats.files += 1
            yield from reader(source, text_field, meta_fields, skip_bad, stats)
            if stats.documents == produced and not is_hf_source(source):
                raise SmallTalkError(f"{source}: empty file: no documents in it; remove it or pass --skip-bad")
        except SmallTalkError:
            if not skip_bad:
                raise
            stats.skipped_files += 1


# ----------------------------------------------------------------------------- records


def _bad(source: str, line: int | None, what: str, skip_bad: bool, stats: ReadStats) -> None:
    """Raise for a bad record, or count it when skipping."""
    if skip_bad:
        stats.skipped += 1
        return
    where = f"{source}:{line}" if line is not None else source
    raise SmallTalkError(f"{where}: {what}; fix the record or pass --skip-bad to skip bad records")


def _clean_surrogates(text: str, stats: ReadStats) -> str:
    """JSON escapes can produce lone surrogates, which are not encodable as UTF-8: replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        stats.invalid_utf8 += 1
        return _SURROGATE.sub("\ufffd", text)


def _document_from_record(record: Any, source: str, line: int, text_field: str, meta_fields: tuple[str, ...],
                          skip_bad: bool, stats: ReadStats, check_surrogates: bool) -> Document | None:
    if not isinstance(record, dict):
        _bad(source, line, f"record is a JSON {type(record).__name__}, expected an object", skip_bad, stats)
        return None
    text = record.get(text_field)
    if not isinstance(text, str):
        what = (f"no field {text_field!r} (fields: {', '.join(sorted(map(str, record))) or 'none'}); "
                "set --text-field" if text_field not in record
                else f"field {text_field!r} is {type(text).__name__}, expected a string")
        _bad(source, line, what, skip_bad, stats)
        return None
    if not text:
        stats.empty += 1
        return None
    if check_surrogates:
        text = _clean_surrogates(text, stats)
    meta = {k: record[k] for k in meta_fields if record.get(k) is not None}
    stats.documents += 1
    return Document(text, meta, source, line)


# ----------------------------------------------------------------------------- file formats


def _open_binary(path: str) -> BinaryIO:
    """Open a possibly compressed file as a buffered binary stream (decompressed)."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _decompression_errors(path: str) -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if path.lower().endswith(".zst"):
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


def _decode(raw: bytes, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return raw.decode("utf-8", "replace")


def _iter_text(path: str, text_field: str, meta_fields: tuple[str, ...], skip_bad: bool, stats: ReadStats):
    raw = Path(path).read_bytes()
    if b"\0" in raw[:_BINARY_PROBE]:
        raise SmallTalkError(f"{path}: looks like a binary file (NUL bytes), not text; remove it from the corpus")
    text = _decode(raw.removeprefix(b"\xef\xbb\xbf"), stats)
    if text.strip():
        stats.documents += 1
        yield Document(text, {}, path, None)


def _iter_jsonl(path: str, text_field: str, meta_fields: tuple[str, ...], skip_bad: bool, stats: ReadStats):
    line_no = 0
    try:
        with _open_binary(path) as f:
            for line_no, raw in enumerate(f, start=1):
                if line_no == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                    if b"\0" in raw[:_BINARY_PROBE]:
                        raise SmallTalkError(f"{path}: looks like a binary file (NUL bytes), not JSON lines; "
                                             "remove it from the corpus")
                if not raw.strip():
                    continue
                try:
                    record = json.loads(_decode(raw, stats))
                except json.JSONDecodeError as e:
                    _bad(path, line_no, f"not valid JSON ({e.msg}; column {e.colno})", skip_bad, stats)
                    continue
                # A lone surrogate can only come from a \\uD8xx-\\uDFxx escape: check the rare lines that have one.
                doc = _document_from_record(record, path, line_no, text_field, meta_fields, skip_bad, stats,
                                            check_surrogates=b"\\ud" in raw or b"\\uD" in raw)
                if doc is not None:
                    yield doc
    except _decompression_errors(path) as e:
        # gzip/zstd errors (not compressed, truncated) and I/O errors all land here.
        where = f"{path}:{line_no + 1}" if line_no else path
        raise SmallTalkError(f"{where}: cannot read ({type(e).__name__}: {e}); the file is corrupt, truncated or "
                             "not in the format its name says") from None


def _iter_parquet(path: str, text_field: str, meta_fields: tuple[str, ...], skip_bad: bool, stats: ReadStats):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise SmallTalkError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise SmallTalkError(f"{path}: Parquet file has no column {text_field!r} (columns: {', '.join(names)}); "
                             "set --text-field")
    if not (pa.types.is_string(pf.schema_arrow.field(text_field).type)
            or pa.types.is_large_string(pf.schema_arrow.field(text_field).type)):
        raise SmallTalkError(f"{path}: column {text_field!r} has type {pf.schema_arrow.field(text_field).type}, "
                             "expected string; set --text-field")
    columns = [text_field] + [m for m in meta_fields if m in names and m != text_field]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                row += 1
                doc = _document_from_record(record, path, row, text_field, meta_fields, skip_bad, stats,
                                            check_surrogates=False)
                if doc is not None:
                    yield doc
    except (pa.ArrowException, OSError) as e:
        raise SmallTalkError(f"{path}: row {row + 1}: cannot read Parquet ({e})") from None


def parse_hf_source(source: str) -> tuple[str, str | None, str | None]:
    """``hf:<name>[:<config>][:<split>]`` -> (name, config, split)."""
    parts = source[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise SmallTalkError(f"{source}: expected hf:<name>[:<config>][:<split>]")
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) >= 2 else None
    return name, config or None, split or None


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise SmallTalkError("reading hf: sources needs the `datasets` package: pip install 'smalltalk[hf]'") from None
    return datasets


def hf_split_names(source: str) -> list[str]:
    """The split names of a Hugging Face dataset source (without loading its data)."""
    datasets = _import_datasets()
    name, config, split = parse_hf_source(source)
    if split is not None:
        return [split]
    try:
        return list(datasets.get_dataset_split_names(name, config))
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError, ...)
        raise SmallTalkError(f"{source}: cannot open Hugging Face dataset ({type(e).__name__}: {e})") from None


def _iter_hf(source: str, text_field: str, meta_fields: tuple[str, ...], skip_bad: bool, stats: ReadStats):
    datasets = _import_datasets()
    name, config, split = parse_hf_source(source)
    try:
        ds = datasets.load_dataset(name, config, split=split or "train", streaming=True)
        rows = iter(ds)
    except Exception as e:
        raise SmallTalkError(f"{source}: cannot open Hugging Face dataset ({type(e).__name__}: {e})") from None
    row = 0
    while True:
        try:
            record = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise SmallTalkError(f"{source}: row {row + 1}: cannot read ({type(e).__name__}: {e})") from None
        row += 1
        doc = _document_from_record(record, source, row, text_field, meta_fields, skip_bad, stats,
                                    check_surrogates=False)
        if doc is not None:
            yield doc


_READERS = {"text": _iter_text, "jsonl": _iter_jsonl, "parquet": _iter_parquet}
