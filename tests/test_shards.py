"""Binary shard format, ShardWriter, TokenDataset, and the sequence packer."""

from __future__ import annotations

import numpy as np
import pytest

from smalltalk.data.packing import SequencePacker
from smalltalk.data.shards import (HEADER_BYTES, MAGIC, Shard, ShardWriter, TokenDataset, read_header, token_dtype,
                                   write_shard)
from smalltalk.errors import SmallTalkError


def test_shard_roundtrip_header_and_memmap(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 2048, size=(7, 16))
    domains = np.array([0, 1, 2, -1, 3, 3, 0], dtype=np.int16)
    header = write_shard(tmp_path / "s.bin", tokens, domains, vocab_size=2048)
    assert (header.token_bytes, header.seq_len, header.num_seqs, header.num_tokens) == (2, 16, 7, 112)
    raw = (tmp_path / "s.bin").read_bytes()
    assert raw[:8] == MAGIC and len(raw) == HEADER_BYTES + 112 * 2 + 7 * 2
    shard = Shard(tmp_path / "s.bin")
    assert isinstance(shard.tokens, np.memmap) and shard.tokens.dtype == np.uint16
    np.testing.assert_array_equal(shard.tokens, tokens)
    np.testing.assert_array_equal(shard.domains, domains)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tokens = np.array([[0, 70000, 100_000, 3]])
    write_shard(tmp_path / "big.bin", tokens, None, vocab_size=100_001)
    shard = Shard(tmp_path / "big.bin")
    assert shard.header.token_bytes == 4
    np.testing.assert_array_equal(shard.tokens, tokens)
    np.testing.assert_array_equal(shard.domains, [-1])


def test_truncated_padded_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.ones((4, 8), dtype=np.int64), None, vocab_size=10)
    raw = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-3])
    (tmp_path / "pad.bin").write_bytes(raw + b"\0")
    (tmp_path / "foreign.bin").write_bytes(b"NOTSMALL" + raw[8:])
    (tmp_path / "tiny.bin").write_bytes(raw[:10])
    for name, words in [("cut.bin", "truncated"), ("pad.bin", "truncated or padded"), ("foreign.bin", "bad magic"),
                        ("tiny.bin", "empty or truncated")]:
        with pytest.raises(SmallTalkError, match=words) as e:
            read_header(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="token id 10 >= vocab_size 10"):
        write_shard(tmp_path / "x.bin", np.full((1, 4), 10), None, vocab_size=10)


def test_shard_writer_splits_into_fixed_size_shards(tmp_path):
    writer = ShardWriter(tmp_path / "train", seq_len=4, vocab_size=100, seqs_per_shard=3)
    seqs = np.arange(8 * 4).reshape(8, 4) % 100
    writer.add(seqs[:2], np.array([0, 1]))
    writer.add(seqs[2:], np.arange(2, 8))
    written = writer.close()
    assert written == [{"file": "shard_00000.bin", "num_seqs": 3}, {"file": "shard_00001.bin", "num_seqs": 3},
                       {"file": "shard_00002.bin", "num_seqs": 2}]
    ds = TokenDataset.from_dir(tmp_path / "train")
    assert (len(ds), ds.seq_len, ds.vocab_size, ds.num_tokens) == (8, 4, 100, 32)
    idx = [7, 0, 3, 2, 5]  # crosses shard boundaries, unsorted
    got = ds.get(idx)
    assert got.dtype == np.int64 and got.shape == (5, 4)
    np.testing.assert_array_equal(got, seqs[idx])
    np.testing.assert_array_equal(ds.domains(idx), idx)
    np.testing.assert_array_equal(ds.domains(), np.arange(8))
    with pytest.raises(IndexError):
        ds.get([8])


def test_token_dataset_errors(tmp_path):
    with pytest.raises(SmallTalkError, match="token directory not found"):
        TokenDataset.from_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SmallTalkError, match="no shard_"):
        TokenDataset.from_dir(tmp_path / "empty")
    write_shard(tmp_path / "a.bin", np.zeros((1, 4), np.int64), None, 10)
    write_shard(tmp_path / "b.bin", np.zeros((1, 8), np.int64), None, 10)
    with pytest.raises(SmallTalkError, match="disagree on seq_len"):
        TokenDataset([tmp_path / "a.bin", tmp_path / "b.bin"])


def _packed_reference(docs: list[np.ndarray], domains: list[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The packing rule written the slow, obvious way: a token list and a per-row vote over documents."""
    stream, owner = [], []
    for d, doc in enumerate(docs):
        stream += doc.tolist()
        owner += [d] * len(doc)
    n = len(stream) // seq_len
    seqs = np.array(stream[:n * seq_len]).reshape(n, seq_len)
    labels = []
    for row in np.array(owner[:n * seq_len]).reshape(n, seq_len):
        ids, counts = np.unique(row, return_counts=True)  # ascending = earliest document first on ties
        labels.append(domains[ids[int(np.argmax(counts))]])
    return seqs, np.array(labels, dtype=np.int16)


@pytest.mark.parametrize("seq_len", [1 + 1, 7, 64])
def test_packer_matches_the_reference_rule(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [np.append(rng.integers(3, 500, size=int(rng.integers(0, 40))), 2) for _ in range(200)]  # EOS = 2
    domains = rng.integers(-1, 5, size=len(docs)).tolist()
    packer = SequencePacker(seq_len, np.uint16)
    got_seqs, got_domains = [], []
    for start in range(0, len(docs), 17):  # feed in uneven batches: the carry must stitch them
        batch = docs[start:start + 17]
        seqs, seq_domains = packer.add(np.concatenate(batch), [len(d) for d in batch],
                                       np.array(domains[start:start + 17], np.int16))
        got_seqs.append(seqs)
        got_domains.append(seq_domains)
    want_seqs, want_domains = _packed_reference(docs, domains, seq_len)
    np.testing.assert_array_equal(np.concatenate(got_seqs), want_seqs)
    np.testing.assert_array_equal(np.concatenate(got_domains), want_domains)
    assert packer.tokens_in == sum(len(d) for d in docs)
    assert packer.tokens_out == want_seqs.size
