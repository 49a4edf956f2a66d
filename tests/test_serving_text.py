"""Streaming text pieces: no half UTF-8 characters, no text that a stop string later takes back."""

from __future__ import annotations

import gzip
import json

import pytest

from smalltalk.data.tokenizer import load_tokenizer
from smalltalk.model.generate import decode
from smalltalk.serving.config import RemoteExpert, ServeConfig, parse_expert_url
from smalltalk.serving.text import TextStream
from smalltalk.errors import SmallTalkError


@pytest.fixture(scope="module")
def tok(tiny_mixture):
    return load_tokenizer(tiny_mixture["tokenizer"])  # trained on English + Python: accents split into bytes


def _french(corpus_dir, chars=600) -> str:
    with gzip.open(corpus_dir / "train" / "novels_fr.jsonl.gz", "rt", encoding="utf-8") as f:
        return json.loads(f.readline())["text"][:chars]


def test_pieces_never_split_a_character_and_add_up_to_the_text(tok, corpus_dir):
    text = _french(corpus_dir) + " Grüße, señor — 東京 🙂"
    ids = tok.encode(text)
    assert any("\ufffd" in decode(tok, ids[:n]) for n in range(1, len(ids)))  # byte tokens really split characters
    stream = TextStream(tok)
    pieces = [stream.add(t) for t in ids] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stop_string_is_cut_and_its_start_is_held_back(tok):
    text = "def f(x):\n    return x\n\nclass A:\n    pass\n"
    stream = TextStream(tok, stop=["\n\nclass"])
    pieces = []
    for t in tok.encode(text):
        pieces.append(stream.add(t))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert stream.stopped and "".join(pieces) == "def f(x):\n    return x"
    assert all("\n\n" not in p for p in pieces)


def test_serve_config_validation():
    assert parse_expert_url("3=http://127.0.0.1:9000").url == "http://127.0.0.1:9000/v1"
    assert RemoteExpert(0, "http://h:1/v1/").url == "http://h:1/v1"
    cfg = ServeConfig(path="x", experts={"1": {"url": "http://h:2", "model": "m"}})
    assert cfg.experts[1].model == "m" and cfg.experts[1].url == "http://h:2/v1"
    for kwargs, message in (({"long_prompt": "cut"}, "long_prompt='cut'"), ({"max_batch_size": 0}, "max_batch_size=0"),
                            ({"experts": {"a": "http://h"}}, "experts key 'a'"),
                            ({"experts": {0: {"url": "http://h", "colour": 1}}}, "unknown keys ['colour']")):
        with pytest.raises(SmallTalkError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ServeConfig(path="x", **kwargs)


def test_a_character_cut_by_the_last_token_is_left_out(tok):
    ids = tok.encode("vu: 東京")
    cut = next(n for n in range(len(ids), 0, -1) if decode(tok, ids[:n]).endswith("\ufffd"))
    stream = TextStream(tok)
    sent = "".join(stream.add(t) for t in ids[:cut]) + stream.finish()
    assert sent == decode(tok, ids[:cut]).rstrip("\ufffd") and "\ufffd" not in sent
