"""Packed token shards: fixed-length sequences in flat binary files, read with ``np.memmap``.

File layout (little endian)::

    offset 0   header, 64 bytes:
               magic b"SMTKTOKS" | version u32 | token_bytes u32 (2 or 4) | seq_len u32 |
               vocab_size u32 | num_seqs u64 | num_tokens u64 |
               crc32 u32 | max_id u32 | flags u32 (bit 0: crc32 and max_id are recorded) | zero to 64 bytes
    offset 64  tokens: num_seqs * seq_len unsigned ints (uint16 when the vocabulary fits)
    then       domain ids: num_seqs int16 (-1 = unknown), the label of the document that
               contributed most tokens to each sequence. Analysis only: routing never reads it.

A shard is written to a temp name and renamed, so a file with the final name is complete; the
reader still checks the file size against the header, so a truncated copy is refused. Opening a shard
also checks the CRC-32 of everything after the header and that the largest token id fits the
vocabulary, so overwritten bytes are reported by file name instead of surfacing as an IndexError
(or not at all). Shards written before the CRC was recorded get the max-id check only.

A *token dataset* is a directory of shards of one split (``<root>/<split>/shard_00000.bin`` ...)
plus the ``manifest.json`` at ``<root>`` that names them.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import SmallTalkError
from ..io import atomic_open

MAGIC = b"SMTKTOKS"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIIIQQ")  # 40 bytes, zero-padded to HEADER_BYTES
_CHECK = struct.Struct("<III")  # crc32, max_id, flags: the 12 bytes after _HEADER
HAS_CHECK = 1
UNKNOWN_DOMAIN = -1
CRC_CHUNK = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    if vocab_size <= 0:
        raise SmallTalkError(f"vocab_size={vocab_size} must be positive")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardHeader:
    token_bytes: int
    seq_len: int
    vocab_size: int
    num_seqs: int
    num_tokens: int
    crc32: int = 0
    max_id: int = 0
    flags: int = 0

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.token_bytes == 2 else np.dtype(np.uint32)

    def expected_size(self) -> int:
        return HEADER_BYTES + self.num_tokens * self.token_bytes + self.num_seqs * 2

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, VERSION, self.token_bytes, self.seq_len, self.vocab_size,
                           self.num_seqs, self.num_tokens) + _CHECK.pack(self.crc32, self.max_id, self.flags)
        return raw + b"\0" * (HEADER_BYTES - len(raw))


def read_header(path: str | Path) -> ShardHeader:
    path = Path(path)
    if not path.exists():
        raise SmallTalkError(f"{path}: shard file not found; re-run `smalltalk prepare`")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise SmallTalkError(f"{path}: shard is empty or truncated ({size} bytes < {HEADER_BYTES}-byte header); "
                             "delete it and re-run the stage that wrote it")
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size + _CHECK.size)
    magic, version, token_bytes, seq_len, vocab_size, num_seqs, num_tokens = _HEADER.unpack(raw[:_HEADER.size])
    crc, max_id, flags = _CHECK.unpack(raw[_HEADER.size:])
    if magic != MAGIC:
        raise SmallTalkError(f"{path}: not a smalltalk token shard (bad magic {magic!r})")
    if version != VERSION:
        raise SmallTalkError(f"{path}: shard format version {version}, this smalltalk reads {VERSION}; re-run prepare")
    if token_bytes not in (2, 4) or seq_len <= 0 or num_tokens != num_seqs * seq_len:
        raise SmallTalkError(f"{path}: corrupt shard header (token_bytes={token_bytes}, seq_len={seq_len}, "
                             f"num_seqs={num_seqs}, num_tokens={num_tokens})")
    header = ShardHeader(token_bytes, seq_len, vocab_size, num_seqs, num_tokens, crc, max_id, flags)
    if size != header.expected_size():
        raise SmallTalkError(f"{path}: shard is truncated or padded ({size} bytes, header says "
                             f"{header.expected_size()}); delete it and re-run the stage that wrote it")
    return header


def write_shard(path: str | Path, tokens: np.ndarray, domains: np.ndarray | None, vocab_size: int) -> ShardHeader:
    """Write sequences `tokens` (num_seqs, seq_len) and their domain ids atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be (num_seqs, seq_len), got {tokens.shape}")
    num_seqs, seq_len = tokens.shape
    dtype = token_dtype(vocab_size)
    if num_seqs and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {vocab_size}")
    if domains is None:
        domains = np.full(num_seqs, UNKNOWN_DOMAIN, dtype=np.int16)
    domains = np.asarray(domains, dtype=np.int16)
    if domains.shape != (num_seqs,):
        raise ValueError(f"domains must be ({num_seqs},), got {domains.shape}")
    token_bytes = np.ascontiguousarray(tokens, dtype=dtype).astype(dtype.newbyteorder("<"), copy=False).tobytes()
    domain_bytes = domains.astype("<i2", copy=False).tobytes()
    crc = zlib.crc32(domain_bytes, zlib.crc32(token_bytes))
    header = ShardHeader(dtype.itemsize, seq_len, vocab_size, num_seqs, num_seqs * seq_len, crc,
                         int(tokens.max()) if num_seqs else 0, HAS_CHECK)
    with atomic_open(path, "wb") as f:
        f.write(header.pack())
        f.write(token_bytes)
        f.write(domain_bytes)
    return header


def check_shard(path: Path, header: ShardHeader, tokens: np.ndarray) -> None:
    """The recorded CRC-32 and token range of a shard (see the module docstring)."""
    hint = "the file was overwritten or damaged; delete it and re-run the stage that wrote it"
    if header.flags & HAS_CHECK:
        crc = 0
        with open(path, "rb") as f:
            f.seek(HEADER_BYTES)
            while chunk := f.read(CRC_CHUNK):
                crc = zlib.crc32(chunk, crc)
        if crc != header.crc32:
            raise SmallTalkError(f"{path}: CRC-32 {crc:08x} differs from the {header.crc32:08x} recorded when the shard "
                                 f"was written; {hint}")
        top = header.max_id
    else:
        top = int(tokens.max()) if header.num_seqs else 0
    if header.num_seqs and top >= header.vocab_size:
        raise SmallTalkError(f"{path}: token id {top} is outside the vocabulary (size {header.vocab_size}); {hint}")


class Shard:
    """One shard opened read-only with memmap: ``tokens`` is (num_seqs, seq_len), ``domains`` (num_seqs,)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header = read_header(self.path)
        h = self.header
        self.tokens = np.memmap(self.path, dtype=h.dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES,
                                shape=(h.num_seqs, h.seq_len)) if h.num_seqs else np.zeros((0, h.seq_len), h.dtype)
        self.domains = np.memmap(self.path, dtype="<i2", mode="r", offset=HEADER_BYTES + h.num_tokens * h.token_bytes,
                                 shape=(h.num_seqs,)) if h.num_seqs else np.zeros((0,), np.int16)
        check_shard(self.path, h, self.tokens)

    def __len__(self) -> int:
        return self.header.num_seqs


class TokenDataset:
    """The concatenation of several shards, indexed by global sequence number.

    ``get(indices)`` returns an int64 array (len(indices), seq_len), ready for ``torch.from_numpy``.
    """

    def __init__(self, shard_paths: Sequence[str | Path]):
        if not shard_paths:
            raise SmallTalkError("no token shards given; run `smalltalk prepare` first")
        self.shards = [Shard(p) for p in shard_paths]
        seq_lens = {s.header.seq_len for s in self.shards}
        vocab = {s.header.vocab_size for s in self.shards}
        if len(seq_lens) != 1 or len(vocab) != 1:
            raise SmallTalkError(f"shards disagree on seq_len {sorted(seq_lens)} or vocab_size {sorted(vocab)}: "
                                 f"{[str(s.path) for s in self.shards]}")
        self.seq_len = seq_lens.pop()
        self.vocab_size = vocab.pop()
        self._offsets = np.cumsum([0] + [len(s) for s in self.shards])  # (num_shards + 1,)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "TokenDataset":
        directory = Path(directory)
        if not directory.is_dir():
            raise SmallTalkError(f"{directory}: token directory not found; run `smalltalk prepare` first")
        paths = sorted(directory.glob("shard_*.bin"))
        if not paths:
            raise SmallTalkError(f"{directory}: no shard_*.bin files; run `smalltalk prepare` first")
        return cls(paths)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sequence index out of range [0, {len(self)})")
        shard_ids = np.searchsorted(self._offsets, indices, side="right") - 1
        return shard_ids, indices - self._offsets[shard_ids]

    def get(self, indices: Iterable[int]) -> np.ndarray:
        """Sequences at global `indices` -> int64 (len(indices), seq_len)."""
        indices = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        shard_ids, local = self._locate(indices)
        for s in np.unique(shard_ids):
            sel = shard_ids == s
            out[sel] = self.shards[s].tokens[local[sel]]
        return out

    def domains(self, indices: Iterable[int] | None = None) -> np.ndarray:
        """Domain ids (int16, -1 unknown) of the sequences at `indices` (all when None)."""
        if indices is None:
            return np.concatenate([np.asarray(s.domains) for s in self.shards]).astype(np.int16)
        indices = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        out = np.empty(len(indices), dtype=np.int16)
        shard_ids, local = self._locate(indices)
        for s in np.unique(shard_ids):
            sel = shard_ids == s
            out[sel] = self.shards[s].domains[local[sel]]
        return out


class ShardWriter:
    """Accumulates sequences and flushes ``shard_{i:05d}.bin`` files of `seqs_per_shard` sequences.

    Shards already present (from an interrupted run) are skipped by index when `resume` is set:
    callers that can regenerate the same sequences deterministically pass ``start_shard``.
    """

    def __init__(self, directory: str | Path, seq_len: int, vocab_size: int, seqs_per_shard: int, start_shard: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.seq_len, self.vocab_size, self.seqs_per_shard = seq_len, vocab_size, seqs_per_shard
        self.next_index = start_shard
        self._tokens: list[np.ndarray] = []
        self._domains: list[np.ndarray] = []
        self._pending = 0
        self.written: list[dict] = []

    def add(self, tokens: np.ndarray, domains: np.ndarray | None = None) -> None:
        """Add sequences (n, seq_len) with optional domain ids (n,)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"expected (n, {self.seq_len}) sequences, got {tokens.shape}")
        if domains is None:
            domains = np.full(len(tokens), UNKNOWN_DOMAIN, dtype=np.int16)
        self._tokens.append(tokens)
        self._domains.append(np.asarray(domains, dtype=np.int16))
        self._pending += len(tokens)
        while self._pending >= self.seqs_per_shard:
            self._flush(self.seqs_per_shard)

    def _flush(self, n: int) -> None:
        tokens = np.concatenate(self._tokens)
        domains = np.concatenate(self._domains)
        path = self.directory / f"shard_{self.next_index:05d}.bin"
        write_shard(path, tokens[:n], domains[:n], self.vocab_size)
        self.written.append({"file": path.name, "num_seqs": int(n)})
        self.next_index += 1
        self._tokens, self._domains = [tokens[n:]], [domains[n:]]
        self._pending = len(tokens) - n

    def close(self) -> list[dict]:
        """Flush the remainder (a final, shorter shard) and return what was written."""
        if self._pending:
            self._flush(self._pending)
        return self.written
