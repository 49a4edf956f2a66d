"""Byte-level BPE tokenizer: exact round trip on every domain, special tokens, HF loading, bad files."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

from smalltalk.data.tokenizer import (TOKENIZER_PRESETS, load_tokenizer, save_pretrained_tokenizer,
                                      train_tokenizer)
from smalltalk.errors import SmallTalkError

TRICKY = [
    "Ça déjà été où? Über größere Bäume — naïve façade, Œuvre «guillemets» ß ẞ",
    "def f(x):\n\tif x:\n        return  x  \r\n\n\n    # trailing spaces   \n",
    "emoji 🙂👩‍💻, CJK 漢字かな, Arabic مرحبا, combining e\u0301, NUL \x00, BOM \ufeff, \u00a0nbsp",
    "control tokens in text stay text: <eos> <bos> <pad></s>",
    " leading space and trailing space ",
    "",
]


@pytest.fixture(scope="module")
def domain_texts(corpus_dir) -> dict[str, list[str]]:
    """Per domain: the first 4 test documents (cut to 6000 chars) of the real corpus."""
    out = {}
    for path in sorted((corpus_dir / "test").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            out[path.name.split(".")[0]] = [json.loads(line)["text"][:6000] for _, line in zip(range(4), f)]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
    """A 1024-token tokenizer trained on ~40 KB of every domain's train text."""
    texts = []
    for path in sorted((corpus_dir / "train").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"][:4000] for _, line in zip(range(10), f)]
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(texts, 1024, out), texts, out


def test_round_trip_is_exact_on_every_domain(trained, domain_texts):
    tok, _, _ = trained
    assert len(domain_texts) == 10
    for domain, texts in domain_texts.items():
        ids = tok.encode_batch(texts)
        for text, row in zip(texts, ids):
            assert tok.decode(row) == text, domain
            assert 0 < len(row) < len(text.encode("utf-8"))  # it compresses
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_ids(trained):
    tok, _, path = trained
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 1024
    assert tok.path == path
    assert tok.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    ids = tok.encode("hello <eos> world")
    assert not {0, 1, 2} & set(ids)  # encode adds no BOS/EOS and a literal "<eos>" is not the control token
    assert tok.decode([1] + ids + [2, 0, 0]) == "hello <eos> world"
    assert tok.decode([1] + ids + [2], skip_special_tokens=False) == "<bos>hello <eos> world<eos>"
    tokens, lengths = tok.encode_documents(["ab", "", "cd e"], dtype=np.uint16)
    assert tokens.dtype == np.uint16 and lengths.tolist() == [len(tok.encode("ab")) + 1, 1, len(tok.encode("cd e")) + 1]
    assert tokens[np.cumsum(lengths) - 1].tolist() == [2, 2, 2] and (tokens == 2).sum() == 3
    assert tokens.tolist() == tok.encode("ab") + [2, 2] + tok.encode("cd e") + [2]


def test_training_is_deterministic_and_load_matches(trained, tmp_path):
    tok, texts, path = trained
    again = train_tokenizer(texts, 1024, tmp_path / "again.json")
    assert again.sha256 == tok.sha256
    loaded = load_tokenizer(path)
    assert loaded.sha256 == tok.sha256 and loaded.vocab_size == 1024
    assert load_tokenizer(path.parent).sha256 == tok.sha256  # a directory holding tokenizer.json
    sample = texts[3][:2000]
    assert loaded.encode(sample) == tok.encode(sample) == tok.encode_batch([sample])[0]


def test_transformers_loads_the_saved_directory_offline(trained, domain_texts, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok, _, path = trained
    out = save_pretrained_tokenizer(path, tmp_path / "hf", model_max_length=256)
    assert sorted(p.name for p in out.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    for cls in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        hf = cls.from_pretrained(out)
        assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
        assert hf.model_max_length == 256
        for texts in domain_texts.values():
            ids = hf(texts[0])["input_ids"]
            assert ids == tok.encode(texts[0])  # same ids, no BOS/EOS added
            assert hf.decode(ids) == texts[0]
        assert hf("a <eos> b")["input_ids"] == tok.encode("a <eos> b")


def test_presets_and_foreign_tokenizers(tmp_path):
    assert TOKENIZER_PRESETS == {"tiny": 2048, "cpu": 8192, "paper": 32000}
    from tokenizers import Tokenizer, models, pre_tokenizers

    gpt2_like = Tokenizer(models.BPE())
    gpt2_like.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2_like.add_special_tokens(["<|endoftext|>"])
    gpt2_like.save(str(tmp_path / "foreign.json"))
    tok = load_tokenizer(tmp_path / "foreign.json")
    assert tok.eos_id == tok.bos_id == tok.pad_id == 0


def test_bad_tokenizer_files(tmp_path):
    cases = {
        "missing.json": None,
        "garbage.json": b"\x00\x01 not json",
        "other.json": b'{"hello": "world"}',
        "empty.json": b"",
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(SmallTalkError) as e:
            load_tokenizer(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "no_eos.json"))
    with pytest.raises(SmallTalkError, match="no end-of-document token"):
        load_tokenizer(tmp_path / "no_eos.json")


@pytest.mark.parametrize("vocab_size", [0, -5, 100, 258, "8192", 2.5, True])
def test_nonsense_vocab_size(vocab_size, tmp_path):
    with pytest.raises(SmallTalkError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
