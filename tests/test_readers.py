"""Corpus readers on real sample-corpus text: every format, directories/globs/lists, HF datasets, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from smalltalk.data.readers import ReadStats, iter_documents, resolve_sources
from smalltalk.errors import SmallTalkError


@pytest.fixture(scope="module")
def records(corpus_dir) -> list[dict]:
    """The first 3 records of every domain's valid file (text cut to 3000 chars to stay small)."""
    out = []
    for path in sorted((corpus_dir / "valid").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for _, line in zip(range(3), f):
                r = json.loads(line)
                out.append({"id": r["id"], "domain": r["domain"], "text": r["text"][:3000]})
    return out


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _one_line_error(exc_info, *needles: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_reads_the_sample_corpus_with_domains_and_line_numbers(corpus_dir):
    path = corpus_dir / "valid" / "math_en.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        want = [json.loads(line) for line in f]
    stats = ReadStats()
    docs = list(iter_documents(path, stats=stats))
    assert len(docs) == len(want) == stats.documents > 10
    assert [d.text for d in docs] == [w["text"] for w in want]
    assert {d.meta["domain"] for d in docs} == {"math_en"}
    assert [d.line for d in docs] == list(range(1, len(want) + 1))
    assert docs[0].source == str(path)
    assert (stats.files, stats.invalid_utf8, stats.skipped) == (1, 0, 0)


def test_directory_glob_and_list_resolve_to_sorted_files(corpus_dir):
    valid = sorted(str(p) for p in (corpus_dir / "valid").glob("*.jsonl.gz"))
    assert len(valid) == 10
    assert resolve_sources(corpus_dir / "valid") == valid
    assert resolve_sources(str(corpus_dir / "valid" / "*.jsonl.gz")) == valid
    assert resolve_sources(str(corpus_dir / "**" / "news_en.jsonl.gz")) == [
        str(corpus_dir / s / "news_en.jsonl.gz") for s in ("test", "train", "valid")]
    # A list is the concatenation, without duplicates.
    assert resolve_sources([valid[1], corpus_dir / "valid"]) == [valid[1]] + [v for v in valid if v != valid[1]]


def test_every_format_yields_the_same_documents(tmp_path, records):
    for r in records:
        r.setdefault("body", r["text"])
    data = _jsonl(records)
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet", row_group_size=7)
    texts = [r["text"] for r in records]
    domains = [r["domain"] for r in records]
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        docs = list(iter_documents(tmp_path / name))
        assert [d.text for d in docs] == texts, name
        assert [d.meta for d in docs] == [{"domain": d} for d in domains], name
        assert [d.line for d in docs] == list(range(1, len(texts) + 1)), name
    # Another text field and other metadata.
    docs = list(iter_documents(tmp_path / "a.parquet", text_field="body", meta_fields=("id", "domain")))
    assert [d.text for d in docs] == texts and docs[4].meta == {"id": records[4]["id"], "domain": domains[4]}
    # Text and Markdown files: the whole file is one document, byte for byte.
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "b.txt").write_text(texts[0], encoding="utf-8")
    (tmp_path / "t" / "a.md").write_text(texts[1], encoding="utf-8")
    docs = list(iter_documents(tmp_path / "t"))
    assert [(Path(d.source).name, d.text, d.line, d.meta) for d in docs] == [
        ("a.md", texts[1], None, {}), ("b.txt", texts[0], None, {})]


def test_hugging_face_dataset_streamed_from_local_files(tmp_path, records, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_bytes(_jsonl(records[:20]))
    (tmp_path / "ds" / "test.jsonl").write_bytes(_jsonl(records[20:]))
    docs = list(iter_documents(f"hf:{tmp_path / 'ds'}:test"))
    assert [d.text for d in docs] == [r["text"] for r in records[20:]]
    assert [d.meta["domain"] for d in docs] == [r["domain"] for r in records[20:]]
    assert docs[0].line == 1 and docs[0].source == f"hf:{tmp_path / 'ds'}:test"
    assert [d.text for d in iter_documents(f"hf:{tmp_path / 'ds'}")] == [r["text"] for r in records[:20]]
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(f"hf:{tmp_path / 'nope'}"))
    _one_line_error(e, "hf:", "cannot open Hugging Face dataset")


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(tmp_path / "missing"))
    _one_line_error(e, str(tmp_path / "missing"), "not found")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("a,b\n")  # unsupported files do not count
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(tmp_path / "empty"))
    _one_line_error(e, "empty directory")
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(str(tmp_path / "*.jsonl")))
    _one_line_error(e, "glob matches no")
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(tmp_path / "empty" / "notes.csv"))
    _one_line_error(e, "notes.csv", "unsupported file type")


@pytest.mark.parametrize("name", ["e.jsonl", "e.txt", "e.jsonl.gz"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"") if name.endswith(".gz") else b"\n  \n")
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(path))
    _one_line_error(e, name, "empty file")
    stats = ReadStats()
    assert list(iter_documents(path, skip_bad=True, stats=stats)) == []
    assert stats.skipped_files == 1


def test_binary_files(tmp_path):
    blob = bytes(range(256)) * 8
    for name, data in [("b.txt", blob), ("b.jsonl", blob), ("b.jsonl.gz", b"this is not gzip" * 10),
                       ("b.jsonl.zst", b"nor zstd" * 10), ("b.parquet", blob)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SmallTalkError) as e:
            list(iter_documents(tmp_path / name))
        _one_line_error(e, name)
    # A gzip stream cut short names the file (and the line where it broke).
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n' * 2000)[:-40])
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(tmp_path / "cut.jsonl.gz"))
    _one_line_error(e, "cut.jsonl.gz", "corrupt, truncated")


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "u.jsonl").write_bytes(b'{"text": "caf\xe9 ok"}\n{"text": "fine"}\n{"text": "lone \\udc80 surrogate"}\n')
    (tmp_path / "u.txt").write_bytes(b"Stra\xdfe \xff\xfe end")
    stats = ReadStats()
    docs = list(iter_documents([tmp_path / "u.jsonl", tmp_path / "u.txt"], stats=stats))
    assert [d.text for d in docs] == ["caf\ufffd ok", "fine", "lone \ufffd surrogate", "Stra\ufffde \ufffd\ufffd end"]
    assert stats.invalid_utf8 == 3 and stats.documents == 4
    for d in docs:
        d.text.encode("utf-8")  # all encodable now


def test_bad_jsonl_records_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"\n{"body": "three"}\n[1, 2]\n{"text": null}\n{"text": "ok"}\n')
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(path))
    _one_line_error(e, f"{path}:3", "not valid JSON", "--skip-bad")
    path.write_text('{"text": "one"}\n{"body": "three", "id": 4}\n')
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(path))
    _one_line_error(e, f"{path}:2", "no field 'text'", "body, id", "--text-field")
    path.write_text('{"text": "one"}\n\n{"text": "two"\n{"body": "three"}\n[1, 2]\n{"text": null}\n{"text": "ok"}\n')
    stats = ReadStats()
    docs = list(iter_documents(path, skip_bad=True, stats=stats))
    assert [(d.text, d.line) for d in docs] == [("one", 1), ("ok", 7)]
    assert stats.skipped == 4 and stats.documents == 2


def test_parquet_without_the_text_column(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"], "domain": ["x", "y"]}), tmp_path / "p.parquet")
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(tmp_path / "p.parquet"))
    _one_line_error(e, "p.parquet", "no column 'text'", "content, domain")
    assert [d.text for d in iter_documents(tmp_path / "p.parquet", text_field="content")] == ["a", "b"]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(SmallTalkError) as e:
        list(iter_documents(tmp_path / "n.parquet"))
    _one_line_error(e, "n.parquet", "expected string")
