"""`prepare`: manifest contract, exact packing, splits, idempotency, resume, CLI and bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from smalltalk.cli import main
from smalltalk.data import prepare as prepare_module
from smalltalk.data.manifest import load_manifest
from smalltalk.data.prepare import prepare
from smalltalk.data.prepare_config import PREPARE_PRESETS, PrepareConfig, preset
from smalltalk.data.sources import plan_sources
from smalltalk.data.shards import TokenDataset
from smalltalk.data.tokenizer import load_tokenizer
from smalltalk.errors import SmallTalkError

DOMAINS = ("code_python", "novels_fr", "wiki_en")


def _read(path: Path, n: int, max_chars: int) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [{**(r := json.loads(line)), "text": r["text"][:max_chars]} for _, line in zip(range(n), f)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_dir) -> Path:
    """Real text, small: <root>/{train,valid,test}/<domain>.jsonl for 3 domains (12/4/4 docs of <= 3000 chars)."""
    root = tmp_path_factory.mktemp("small_corpus")
    for split, n in (("train", 12), ("valid", 4), ("test", 4)):
        for domain in DOMAINS:
            _write_jsonl(root / split / f"{domain}.jsonl", _read(corpus_dir / split / f"{domain}.jsonl.gz", n, 3000))
    return root


def _cfg(corpus, out, **kw) -> PrepareConfig:
    base = dict(corpus=(str(corpus),), out_dir=str(out), vocab_size=400, seq_len=64, tokenizer_sample_bytes=200_000,
                seqs_per_shard=100, num_workers=2, progress=False, batch_bytes=20_000)
    return PrepareConfig(**{**base, **kw})


def _docs(corpus: Path, split: str) -> list[dict]:
    return [json.loads(line) for f in sorted((corpus / split).glob("*.jsonl")) for line in f.read_text().splitlines()]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------- the tiny preset


def test_tiny_data_follows_the_manifest_contract(tiny_data, corpus_dir):
    m = load_manifest(tiny_data, check_shards=True)
    assert (m["format"], m["version"], m["seq_len"], m["vocab_size"], m["token_dtype"]) == (
        "smalltalk-tokens", 1, 128, 2048, "uint16")
    assert m["tokenizer"] == {"file": "tokenizer.json", "sha256": hashlib.sha256(
        (tiny_data / "tokenizer.json").read_bytes()).hexdigest(), "bos_id": 1, "eos_id": 2, "pad_id": 0, "trained": True}
    assert m["domains"] == sorted(p.name.split(".")[0] for p in (corpus_dir / "train").glob("*.jsonl.gz"))
    assert m["stats"]["invalid_utf8"] == 0 and m["stats"]["skipped"] == 0
    for split in ("train", "valid", "test"):
        info = m["splits"][split]
        ds = TokenDataset.from_dir(tiny_data / split)
        assert len(ds) == info["num_seqs"] == sum(s["num_seqs"] for s in info["shards"]) > 3000
        assert info["num_tokens"] == info["num_seqs"] * 128 == ds.num_tokens
        assert ds.vocab_size == 2048
        counts = np.bincount(ds.domains(), minlength=10)
        assert {d: int(c) for d, c in zip(m["domains"], counts)} == info["domain_counts"]
        assert min(counts) > 100  # every domain is represented
        # num_bytes: the text bytes of the split, pro-rated to the tokens kept in complete sequences.
        kept = info["num_tokens"] / info["num_tokens_before_packing"]
        assert info["num_bytes"] == round(info["num_text_bytes"] * kept)
        assert 2.0 < info["num_bytes"] / info["num_tokens"] < 4.5  # bytes per token of a 2k BPE vocabulary
        # Each document is followed by exactly one EOS; only the short tail is dropped.
        eos = int((ds.get(range(len(ds))) == 2).sum())
        assert info["num_documents"] - 128 <= eos <= info["num_documents"]
    # The first train sequence is the beginning of the first training document (books_en, sorted first).
    first_doc = json.loads(gzip.open(corpus_dir / "train" / "books_en.jsonl.gz", "rt").readline())["text"]
    tok = load_tokenizer(tiny_data / "tokenizer.json")
    head = tok.decode(TokenDataset.from_dir(tiny_data / "train").get([0])[0])
    assert first_doc.startswith(head) and len(head) > 200


def test_presets():
    assert {k: (v.seq_len, v.vocab_size) for k, v in PREPARE_PRESETS.items()} == {
        "tiny": (128, 2048), "cpu": (256, 8192), "paper": (1024, 32000)}
    assert PREPARE_PRESETS["cpu"].max_bytes_per_file is None  # cpu = the full corpus
    assert preset("tiny", seq_len=64).seq_len == 64
    with pytest.raises(SmallTalkError, match="unknown prepare preset"):
        preset("huge")


# ------------------------------------------------------------------------------------- exact packing


def test_packing_is_exact_and_labels_the_majority_domain(small_corpus, tmp_path):
    m = prepare(_cfg(small_corpus, tmp_path / "d"))
    tok = load_tokenizer(tmp_path / "d" / "tokenizer.json")
    assert m["domains"] == list(DOMAINS) and m["vocab_size"] == 400
    for split in ("train", "valid", "test"):
        docs = _docs(small_corpus, split)
        stream, owner = [], []
        for i, d in enumerate(docs):
            ids = tok.encode(d["text"]) + [2]
            stream += ids
            owner += [i] * len(ids)
        n = len(stream) // 64
        ds = TokenDataset.from_dir(tmp_path / "d" / split)
        assert len(ds) == n == m["splits"][split]["num_seqs"]
        np.testing.assert_array_equal(ds.get(range(n)), np.array(stream[:n * 64]).reshape(n, 64))
        want = []
        for row in np.array(owner[:n * 64]).reshape(n, 64):
            ids, counts = np.unique(row, return_counts=True)
            want.append(DOMAINS.index(docs[ids[np.argmax(counts)]]["domain"]))
        np.testing.assert_array_equal(ds.domains(), want)
        info = m["splits"][split]
        assert info["num_documents"] == len(docs)
        assert info["num_text_bytes"] == sum(len(d["text"].encode("utf-8")) for d in docs)
        if split == "train":
            assert len(info["shards"]) == -(-n // 100)  # seqs_per_shard=100


def test_in_process_encoding_gives_identical_shards(small_corpus, tmp_path):
    a = prepare(_cfg(small_corpus, tmp_path / "a", num_workers=2))
    b = prepare(_cfg(small_corpus, tmp_path / "b", num_workers=1))
    assert a["fingerprint"] == b["fingerprint"]  # worker count is not part of the identity
    for shard in a["splits"]["train"]["shards"] + a["splits"]["test"]["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()


# ------------------------------------------------------------------------------------- splits and sources


def test_corpus_without_splits_is_split_by_document_hash(small_corpus, tmp_path):
    flat = tmp_path / "flat"
    docs = [d for split in ("train", "valid", "test") for d in _docs(small_corpus, split)]
    for domain in DOMAINS:
        _write_jsonl(flat / f"{domain}.jsonl", [d for d in docs if d["domain"] == domain])
    assert {p.split for p in plan_sources([str(flat)])} == {"hash"}
    m1 = prepare(_cfg(flat, tmp_path / "o1", valid_fraction=0.2, test_fraction=0.2))
    m2 = prepare(_cfg(flat, tmp_path / "o2", valid_fraction=0.2, test_fraction=0.2))
    m3 = prepare(_cfg(flat, tmp_path / "o3", valid_fraction=0.2, test_fraction=0.2, seed=1))
    per_split = lambda m: [m["splits"][s]["num_documents"] for s in ("train", "valid", "test")]  # noqa: E731
    assert sum(per_split(m1)) == len(docs) == 60
    assert per_split(m1) == per_split(m2) and min(per_split(m1)) >= 4  # deterministic, every split gets some
    assert per_split(m3) != per_split(m1)  # the seed salts the hash
    for s in ("train", "valid", "test"):
        assert (tmp_path / "o1" / s / "shard_00000.bin").read_bytes() == (tmp_path / "o2" / s / "shard_00000.bin").read_bytes()


def test_hugging_face_source_keeps_its_splits(small_corpus, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for split, hf_name in (("train", "train"), ("valid", "validation"), ("test", "test")):
        _write_jsonl(tmp_path / "hf" / f"{hf_name}.jsonl", _docs(small_corpus, split))
    m = prepare(_cfg(f"hf:{tmp_path / 'hf'}", tmp_path / "out"))
    ref = prepare(_cfg(small_corpus, tmp_path / "ref"))
    assert [s["split"] for s in m["sources"]] == ["train", "valid", "test"]
    for split in ("train", "valid", "test"):
        assert m["splits"][split]["num_documents"] == ref["splits"][split]["num_documents"]
    assert m["tokenizer"]["sha256"] == ref["tokenizer"]["sha256"]  # same text in the same order
    assert m["splits"]["valid"]["num_seqs"] == ref["splits"]["valid"]["num_seqs"]


def test_given_tokenizer_is_used_not_trained(small_corpus, tiny_data, tmp_path):
    m = prepare(_cfg(small_corpus, tmp_path / "d", tokenizer_file=str(tiny_data / "tokenizer.json")))
    assert m["tokenizer"]["sha256"] == load_manifest(tiny_data)["tokenizer"]["sha256"]
    assert m["tokenizer"]["trained"] is False and m["vocab_size"] == 2048
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == (tiny_data / "tokenizer.json").read_bytes()


def test_max_bytes_per_file_takes_the_start_of_each_file(small_corpus, tmp_path):
    m = prepare(_cfg(small_corpus, tmp_path / "d", max_bytes_per_file=5000))
    for split in ("train", "valid", "test"):
        sizes = [sum(len(json.loads(line)["text"].encode("utf-8")) for line in f.read_text().splitlines())
                 for f in (small_corpus / split).glob("*.jsonl")]
        want = sum(min(5000, size) for size in sizes)  # each file cut at 5000 bytes (mid-character cuts lose < 4)
        assert want - 4 * len(sizes) < m["splits"][split]["num_text_bytes"] <= want
        assert m["splits"][split]["num_documents"] < 3 * 4


# ------------------------------------------------------------------------------------- idempotency, resume


def test_rerun_is_idempotent_and_changes_repack(small_corpus, tmp_path):
    logs = []
    m1 = prepare(_cfg(small_corpus, tmp_path / "d"), log=logs.append)
    before = _tree(tmp_path / "d")
    m2 = prepare(_cfg(small_corpus, tmp_path / "d", num_workers=1), log=logs.append)
    assert m2 == m1 and _tree(tmp_path / "d") == before
    assert "up to date" in logs[-1]
    # Another seq_len re-packs with the same tokenizer (not retrained).
    m3 = prepare(_cfg(small_corpus, tmp_path / "d", seq_len=32), log=logs.append)
    assert any("reusing the tokenizer" in line for line in logs)
    assert m3["tokenizer"]["sha256"] == m1["tokenizer"]["sha256"]
    assert m3["splits"]["train"]["num_seqs"] in (2 * m1["splits"]["train"]["num_seqs"],
                                                 2 * m1["splits"]["train"]["num_seqs"] + 1)
    # A corpus file that changes invalidates the dataset.
    changed = tmp_path / "changed"
    import shutil

    shutil.copytree(small_corpus, changed)
    prepare(_cfg(changed, tmp_path / "c"))
    with open(changed / "train" / "wiki_en.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document " * 50, "domain": "wiki_en"}) + "\n")
    m4 = prepare(_cfg(changed, tmp_path / "c"))
    assert m4["splits"]["train"]["num_documents"] == 37


def test_interrupted_run_resumes_cleanly(small_corpus, tmp_path, monkeypatch):
    clean = prepare(_cfg(small_corpus, tmp_path / "clean"))
    out = tmp_path / "d"
    real_add = prepare_module._SplitSink.add
    calls = []

    def add_then_interrupt(self, *args):  # fault injection: the user presses Ctrl-C mid-way
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_add(self, *args)

    monkeypatch.setattr(prepare_module._SplitSink, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(small_corpus, out))
    monkeypatch.setattr(prepare_module._SplitSink, "add", real_add)
    assert not (out / "manifest.json").exists()  # not a dataset until finished
    assert (out / "tokenizer.json").exists() and not list(out.rglob("*.tmp"))
    with pytest.raises(SmallTalkError, match="no manifest.json"):
        load_manifest(out)
    (out / "train" / "shard_00042.bin").write_bytes(b"stale")  # leftovers must not leak into the new dataset
    (out / "train" / ".shard_00001.bin.x.tmp").write_bytes(b"half")
    logs = []
    m = prepare(_cfg(small_corpus, out), log=logs.append)
    assert any("reusing the tokenizer" in line for line in logs)
    assert sorted(p.name for p in (out / "train").iterdir()) == [s["file"].split("/")[1] for s in m["splits"]["train"]["shards"]]
    assert m["splits"] == clean["splits"]
    for shard in m["splits"]["train"]["shards"]:
        assert (out / shard["file"]).read_bytes() == (tmp_path / "clean" / shard["file"]).read_bytes()


# ------------------------------------------------------------------------------------- CLI and bad input


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["prepare", "--no-progress", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prepares_and_reports(small_corpus, tmp_path, capsys):
    code, out, err = _cli(capsys, "--preset", "tiny", "--corpus", small_corpus, "--out", tmp_path / "d",
                          "--vocab-size", 300, "--seq-len", 32, "--workers", 1)
    assert code == 0, err
    m = load_manifest(tmp_path / "d")
    assert (m["seq_len"], m["vocab_size"], m["config"]["name"]) == (32, 300, "tiny")
    assert f"train: {m['splits']['train']['num_seqs']:8d} sequences x 32 tokens" in out
    code, out, err = _cli(capsys, "--preset", "tiny", "--corpus", small_corpus, "--out", tmp_path / "d",
                          "--vocab-size", 300, "--seq-len", 32)
    assert code == 0 and "up to date" in err


@pytest.mark.parametrize("args, needle", [
    (["--corpus", "{tmp}/missing"], "corpus path not found"),
    (["--corpus", "{tmp}/emptydir"], "empty directory"),
    (["--seq-len", "0"], "seq_len=0 makes no sense"),
    (["--seq-len", "1"], "seq_len=1 makes no sense"),
    (["--vocab-size", "100"], "vocab_size=100 makes no sense"),
    (["--tokenizer", "{tmp}/broken.json"], "not a Hugging Face tokenizer.json"),
    (["--tokenizer", "{tmp}/absent.json"], "tokenizer file not found"),
    (["--tokenizer", "{tmp}/broken.json", "--vocab-size", "512"], "--vocab-size conflicts with --tokenizer"),
    (["--corpus", "{tmp}/bad/bad.parquet"], "no column 'text'"),
    (["--corpus", "{tmp}/bad/bad.jsonl"], "bad.jsonl:3: not valid JSON"),
    (["--corpus", "{tmp}/bad/empty.jsonl"], "empty file"),
    (["--corpus", "{tmp}/bad/binary.txt"], "binary file"),
    (["--corpus", "{tmp}/bad/short.jsonl"], "fewer than one sequence"),
    (["--corpus", "{tmp}/bad/bad.jsonl", "--text-field", "body"], "bad.jsonl:1: no field 'body'"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(args, needle, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "emptydir").mkdir()
    (tmp_path / "broken.json").write_text('{"model": {"type": "Nope"}}')
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"content": ["x" * 100]}), bad / "bad.parquet")
    (bad / "bad.jsonl").write_text(('{"text": "' + "fine text " * 300 + '"}\n') * 2 + '{"text": oops}\n')
    (bad / "empty.jsonl").write_text("")
    (bad / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (bad / "short.jsonl").write_text('{"text": "too short"}\n')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    small_vocab = [] if {"--vocab-size", "--tokenizer"} & set(argv) else ["--vocab-size", 300]
    code, out, err = _cli(capsys, "--preset", "tiny", "--out", tmp_path / "out", *small_vocab, *argv)
    assert code == 2
    last = err.strip().splitlines()[-1]  # progress lines may come first; the error is one line, last
    assert last.startswith("error: ") and needle in last and err.count("error") == 1, err
    assert not (tmp_path / "out").exists()


def test_skip_bad_skips_and_reports(small_corpus, tmp_path, capsys):
    import shutil

    corpus = tmp_path / "c"
    shutil.copytree(small_corpus, corpus)
    with open(corpus / "train" / "wiki_en.jsonl", "ab") as f:
        f.write(b'{"text": "truncated\n{"body": "no text"}\n{"text": "caf\xe9 latin-1"}\n')
    code, out, err = _cli(capsys, "--corpus", corpus, "--out", tmp_path / "d", "--vocab-size", 300, "--seq-len", 32)
    assert code == 2 and "wiki_en.jsonl:13: not valid JSON" in err
    assert not (tmp_path / "d").exists()
    code, out, err = _cli(capsys, "--corpus", corpus, "--out", tmp_path / "d", "--vocab-size", 300, "--seq-len", 32,
                          "--skip-bad")
    assert code == 0, err
    assert "skipped 2 bad records" in out and "1 documents had invalid UTF-8" in out
    stats = load_manifest(tmp_path / "d")["stats"]
    assert (stats["skipped"], stats["invalid_utf8"], stats["documents"]) == (2, 1, 61)


def test_out_dir_that_is_not_ours_is_refused(small_corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(SmallTalkError, match="not a smalltalk data directory"):
        prepare(_cfg(small_corpus, tmp_path / "mine"))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_load_manifest_refuses_what_is_not_a_complete_dataset(tiny_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    assert load_manifest(copy, check_shards=True)["seq_len"] == 128
    (copy / "valid" / "shard_00000.bin").unlink()
    with pytest.raises(SmallTalkError, match="shard listed in the manifest is missing"):
        load_manifest(copy)
    (copy / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(SmallTalkError, match="not a smalltalk token-dataset manifest"):
        load_manifest(copy)


def test_rebuild_keeps_the_old_dataset_until_the_new_one_is_complete(small_corpus, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "d"
    prepare(_cfg(small_corpus, out))
    before = _tree(out)
    # Bad input in a rebuild (a broken JSONL line): a clear error, and the finished dataset is untouched.
    bad = tmp_path / "bad"
    shutil.copytree(small_corpus, bad)
    with open(bad / "train" / "wiki_en.jsonl", "a") as f:
        f.write('{"text": "cut off\n')
    with pytest.raises(SmallTalkError, match="wiki_en.jsonl"):
        prepare(_cfg(bad, out))
    assert _tree(out) == before and load_manifest(out, check_shards=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "d"]  # no staging left behind
    # Ctrl-C in a rebuild with another seq_len: still the old dataset; re-running finishes and swaps it in.
    real_add = prepare_module._SplitSink.add

    def interrupt(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module._SplitSink, "add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(small_corpus, out, seq_len=32))
    monkeypatch.setattr(prepare_module._SplitSink, "add", real_add)
    assert _tree(out) == before and load_manifest(out)["seq_len"] == 64
    logs = []
    m = prepare(_cfg(small_corpus, out, seq_len=32), log=logs.append)
    assert m["seq_len"] == 32 and load_manifest(out, check_shards=True)["seq_len"] == 32
    assert any("reusing the tokenizer" in line for line in logs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "d"]


def test_long_documents_are_tokenized_in_pieces_with_the_same_tokens(small_corpus, tmp_path):
    """A document longer than max_doc_chars is encoded in pieces (bounded tokenizer memory) joined without EOS:
    every shard is byte-identical to encoding each document whole (code with indentation runs included)."""
    whole = prepare(_cfg(small_corpus, tmp_path / "whole"))
    pieces = prepare(_cfg(small_corpus, tmp_path / "pieces", max_doc_chars=700,
                          tokenizer_file=str(tmp_path / "whole" / "tokenizer.json")))
    for split in ("train", "valid", "test"):
        assert pieces["splits"][split]["num_documents"] == whole["splits"][split]["num_documents"]
        for a, b in zip(whole["splits"][split]["shards"], pieces["splits"][split]["shards"]):
            assert (tmp_path / "whole" / a["file"]).read_bytes() == (tmp_path / "pieces" / b["file"]).read_bytes()
    with pytest.raises(SmallTalkError, match="max_doc_chars=0"):
        _cfg(small_corpus, tmp_path / "x", max_doc_chars=0)


def test_a_vocabulary_the_text_cannot_fill_is_reported(small_corpus, tmp_path):
    lines = []
    manifest = prepare(_cfg(small_corpus, tmp_path / "big", vocab_size=30000), log=lines.append)
    assert manifest["vocab_size"] < 30000
    assert any(f"asked for a 30000-token vocabulary, but the training text only supports {manifest['vocab_size']}"
               in line for line in lines)


def test_a_byte_cap_per_file_is_reported(small_corpus, tmp_path):
    lines = []
    prepare(_cfg(small_corpus, tmp_path / "capped", max_bytes_per_file=2000), log=lines.append)
    assert any("read only the first 2,000 bytes of text of" in line for line in lines)
    lines.clear()
    prepare(_cfg(small_corpus, tmp_path / "whole"), log=lines.append)
    assert not any("read only the first" in line for line in lines)
